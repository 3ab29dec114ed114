"""Remotes of records (BuildKit's cache/remote.go): the descriptors of a chain, parent
first, with each record's blob made or converted as asked, and a provider that serves them
from the content store, pulling lazy blobs first.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, BinaryIO, Final

from .._tasks import run_all, unwrapped
from ..client import Client, Descriptor
from ..compression import Compression, needs_conversion
from ..errors import CacheError, NotFoundError
from ..remote import DescHandlers, Remote
from .blobs import (
    CHUNK,
    Views,
    chain_of,
    create_blob,
    get_compression_blob,
    oci_desc,
    set_chains,
    temporary_lease,
    unlazy,
    variant_label,
)
from .converter import ensure_compression

if TYPE_CHECKING:
    from ._core import Core
    from .refs import ImmutableRef, _Record

DISTRIBUTION_SOURCE_PREFIX: Final = "containerd.io/distribution.source."
_REGISTRY_HOST: Final = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]+)?$")


def get_remote(
    ref: ImmutableRef,
    *,
    create_if_needed: bool,
    compression: Compression,
    force_compression: bool,
) -> Remote:
    """The descriptors of the ref's chain, parent first, creating missing blobs through
    containerd's diff service and converting to `compression` when forced; without force, a
    `compression` variant made before is served in place of the blob."""
    core = ref._rec.core
    dhs = ref.desc_handlers
    with temporary_lease(core) as leased:
        ref.finalize()
        chain = chain_of(ref)
        views = Views(core, leased)
        # Each layer's blob, variant and descriptor are made and read concurrently with the
        # others'; only the chain ids, which follow the parents, are set in order.
        try:
            with unwrapped():
                descriptors = run_all(
                    [
                        lambda r=r: _layer_desc(  # type: ignore[misc]
                            r, dhs, leased, views, create_if_needed, compression, force_compression
                        )
                        for r in chain
                    ]
                )
        finally:
            views.close()
        for r in chain:
            set_chains(r)
    entries = {d.digest: (r, d) for r, d in zip(chain, descriptors, strict=True)}
    provider = _RemoteProvider(core, entries, dhs)
    return Remote(descriptors, provider, provider.unlazy_all)


def _layer_desc(
    rec: _Record,
    dhs: DescHandlers,
    leased: Client,
    views: Views,
    create_if_needed: bool,
    compression: Compression,
    force: bool,
) -> Descriptor:
    """The record's descriptor in the remote: its blob, made if needed, or the
    `compression` variant of it. The variant is served when forced, when the blob had to be
    made in another compression, or when the variant exists already (serving it converts
    nothing, and the same request gets the same layer every time)."""
    core = rec.core
    made_other = core.flight.do(
        f"blob-{rec.id}-{create_if_needed}",
        lambda: create_blob(rec, dhs, leased, create_if_needed, compression, views),
    )
    desc = oci_desc(rec, dhs)
    use_variant = force or made_other or _has_variant(rec, desc, compression)
    if use_variant:
        ensure_compression(rec, dhs, leased, compression)
        desc = oci_desc(rec, dhs)  # a conversion pulls a lazy blob
    # Only a record pulled from an image has sources to name (no Info call for the others).
    if rec.md.image_refs and rec.is_lazy():
        desc = _with_distribution_sources(desc, rec.md.image_refs)
    if not (use_variant and needs_conversion(desc.media_type, desc.annotations, compression)):
        return desc
    try:
        blob = get_compression_blob(rec, compression)
    except NotFoundError:
        raise CacheError(f"no {compression.value} variant of {desc.digest} was made") from None
    return replace(
        desc,
        media_type=blob.media_type,
        digest=blob.digest,
        size=blob.size,
        annotations={**desc.annotations, **blob.annotations},
    )


def _has_variant(rec: _Record, desc: Descriptor, compression: Compression) -> bool:
    """Whether the record's blob `desc` is not of `compression` but a variant of it is
    recorded."""
    if not needs_conversion(desc.media_type, desc.annotations, compression):
        return False
    try:
        labels = rec.core.client.content.info(rec.md.blob).labels
    except NotFoundError:
        return False  # lazy: no variant was made from it here
    return variant_label(compression) in labels


def _with_distribution_sources(desc: Descriptor, image_refs: Sequence[str]) -> Descriptor:
    """Adds `containerd.io/distribution.source.<host>` = repositories, for image refs that
    name their registry host."""
    annotations = dict(desc.annotations)
    for image_ref in image_refs:
        host, _, rest = image_ref.partition("/")
        if not rest or not _REGISTRY_HOST.match(host):
            continue
        if not ("." in host or ":" in host or host == "localhost"):
            continue
        repository = rest.split("@", 1)[0].rsplit(":", 1)[0] if ":" in rest else rest.split("@")[0]
        key = DISTRIBUTION_SOURCE_PREFIX + host.split(":")[0]
        repos = [r for r in annotations.get(key, "").split(",") if r]
        if repository not in repos:
            repos.append(repository)
        annotations[key] = ",".join(repos)
    return replace(desc, annotations=annotations)


class _RemoteProvider:
    """Serves a remote's descriptors from the content store, pulling lazy ones first."""

    def __init__(
        self, core: Core, entries: Mapping[str, tuple[_Record, Descriptor]], dhs: DescHandlers
    ) -> None:
        self._core = core
        self._entries = entries
        self._dhs = dhs

    def _unlazy(self, digest: str) -> None:
        rec, desc = self._entries[digest]
        if desc.digest == rec.md.blob:
            unlazy(rec, desc, self._dhs.get(desc.digest))

    def open(self, desc: Descriptor) -> BinaryIO:
        if desc.digest not in self._entries:
            raise NotFoundError(f"blob {desc.digest} is not part of this remote")
        self._unlazy(desc.digest)
        return io.BufferedReader(self._core.client.content.open(desc.digest), CHUNK)

    def unlazy_all(self) -> None:
        with unwrapped():
            run_all([lambda d=d: self._unlazy(d) for d in self._entries])  # type: ignore[misc]
