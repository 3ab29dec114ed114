"""Where lazy blobs come from (providers and descriptor handlers) and what `get_remote`
returns (BuildKit's cache/remote.go and opts.go)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Final, Literal, Protocol, runtime_checkable

from . import _validate
from ._layout_files import LayoutFiles, blob_parts
from .client.types import Descriptor
from .errors import InvalidError, NotFoundError

__all__ = [
    "DEFAULT_STALL_TIMEOUT",
    "DescHandler",
    "OCILayoutProvider",
    "ProgressEvent",
    "Provider",
    "Remote",
]


@runtime_checkable
class Provider(Protocol):
    """A source of blobs by descriptor."""

    def open(self, desc: Descriptor) -> BinaryIO:
        """A readable stream of the blob; `NotFoundError` when this provider does not have it."""
        ...


@dataclass(frozen=True)
class ProgressEvent:
    """What a progress callback hears: `start`, then `bytes` as data moves (`current` of
    `total`), `status` for a named step (`extracting <digest>`), and `end` (with the error,
    if the work failed)."""

    kind: Literal["start", "bytes", "status", "end"]
    digest: str
    current: int = 0
    total: int = 0
    message: str = ""
    error: BaseException | None = None


ProgressCallback = Callable[[ProgressEvent], None]


DEFAULT_STALL_TIMEOUT: Final = 60.0


@dataclass
class DescHandler:
    """How to fetch one lazy blob, and what to tell about it.

    A pull fails with `UnavailableError` when the provider makes no progress (its `open`,
    or one read of its stream, does not return) for `stall_timeout` seconds; the ingest is
    then aborted and the blocked read abandoned. `annotations` become content labels, so
    each key and value must fit containerd's label limit (`InvalidError` otherwise).
    """

    provider: Provider
    progress: ProgressCallback | None = None
    snapshot_labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    ref: str = ""
    stall_timeout: float = DEFAULT_STALL_TIMEOUT

    def __post_init__(self) -> None:
        if not self.stall_timeout > 0:
            raise InvalidError(f"stall_timeout must be positive, not {self.stall_timeout!r}")
        _validate.annotation_labels(self.annotations, prefix=_validate.ANNOTATION_LABEL_PREFIX)
        _validate.annotation_labels(self.snapshot_labels)


DescHandlers = Mapping[str, DescHandler]


_MAX_LAYOUT_FILE: Final = 4096


class OCILayoutProvider:
    """Serves the blobs of an OCI image layout directory (`blobs/<algorithm>/<hex>`).

    The layout is not trusted: its entries are reached without following symlinks, and a
    symlink, FIFO or device where a file or directory should be is an `InvalidError`."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self._files = LayoutFiles(self.path)
        layout = self.path / "oci-layout"
        try:
            version = json.loads(self._files.read(["oci-layout"], _MAX_LAYOUT_FILE)).get(
                "imageLayoutVersion"
            )
        except InvalidError as err:
            raise InvalidError(f"{self.path} is not an OCI image layout: {err}") from None
        except (OSError, ValueError, AttributeError):
            raise InvalidError(
                f"{self.path} is not an OCI image layout (no valid {layout.name})"
            ) from None
        if version != "1.0.0":
            raise InvalidError(f"{self.path}: unsupported OCI image layout version {version!r}")

    def blob_path(self, digest: str) -> pathlib.Path:
        """Where the layout keeps the blob of `digest` (checked to be sha256)."""
        return self._files.path(blob_parts(digest))

    def open(self, desc: Descriptor) -> BinaryIO:
        """A readable stream of the blob; `NotFoundError` when the layout does not have it,
        `InvalidError` when it, or a directory on the way, is a symlink or not regular."""
        try:
            return self._files.open(blob_parts(desc.digest))
        except FileNotFoundError:
            raise NotFoundError(
                f"blob {desc.digest} is not in the OCI layout {self.path}"
            ) from None


class Remote:
    """A chain of layer descriptors, parent first, and a provider that serves every one of
    them (a lazy one is pulled into the content store on its first open)."""

    def __init__(
        self,
        descriptors: Sequence[Descriptor],
        provider: Provider,
        unlazy: Callable[[], None],
    ) -> None:
        self.descriptors = list(descriptors)
        self.provider = provider
        self._unlazy = unlazy

    def unlazy(self) -> None:
        """Pulls every lazy blob of the chain into the content store, concurrently."""
        self._unlazy()

    def __repr__(self) -> str:
        return f"Remote({[d.digest for d in self.descriptors]})"
