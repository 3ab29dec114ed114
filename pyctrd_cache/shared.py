"""Which records images use (BuildKit's prune ref checker, snapshot/imagerefchecker).

A record is shared when an image in the namespace's containerd image store has exactly the
record's chain of layer blobs. Shared records are listed as such by `disk_usage` and kept by
`prune` unless it is told to remove everything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from .client import Client, Descriptor
from .errors import CacheError

__all__ = ["ImageStoreChecker", "SharedChecker", "SharedCheckerFactory"]

# The empty gzip layer, which image builders add without a file-system change.
EMPTY_GZIP_LAYER: Final = "sha256:4f4fb700ef54461cfa02571ae0db9a0dc1e0cdb5577484a6d75e68dc38e8acc1"
_MANIFESTS: Final = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
_INDEXES: Final = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


class SharedChecker(Protocol):
    def exists(self, record_id: str, blobs: Sequence[str]) -> bool:
        """Whether something outside the cache uses the chain `blobs` (parent first)."""
        ...


SharedCheckerFactory = Callable[[], SharedChecker]
"""Called once per `disk_usage` or `prune`, so that a checker may cache what it learns."""


def _layer_key(blobs: Sequence[str]) -> str:
    return "".join(b for b in blobs if b != EMPTY_GZIP_LAYER)


class ImageStoreChecker:
    """The default checker: the layer chains of every image in the image store."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._keys: set[str] | None = None

    def exists(self, record_id: str, blobs: Sequence[str]) -> bool:
        if self._keys is None:
            self._keys = set()
            for image in self._client.images.list():
                self._walk(image.target, depth=0)
        key = _layer_key(blobs)
        return bool(key) and key in self._keys

    def _walk(self, desc: Descriptor, depth: int) -> None:
        if depth > 4 or desc.media_type not in _MANIFESTS | _INDEXES:
            return
        try:
            document = json.loads(b"".join(self._client.content.read(desc.digest)))
        except (CacheError, ValueError):
            return  # not pulled here, or not a JSON document: it shares nothing
        if desc.media_type in _MANIFESTS:
            layers = [str(layer.get("digest", "")) for layer in document.get("layers") or []]
            if key := _layer_key(layers):
                assert self._keys is not None
                self._keys.add(key)
            return
        for manifest in document.get("manifests") or []:
            try:
                self._walk(Descriptor.from_oci(manifest), depth + 1)
            except (KeyError, TypeError, ValueError):
                continue
