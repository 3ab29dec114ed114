"""Compression variants of a record's blob (BuildKit's cache/converter.go): a blob streamed
out of the content store, checked against its diff id, recompressed (or rewritten as
eStargz) and written back, then recorded as a variant held by the record's lease
(`blobs.add_compression_blob`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .._streams import ChunkReader, ChunkWriter
from .._tasks import pipelined, produced
from ..client import Client, Descriptor
from ..compression import (
    Compression,
    decompressed_chunks,
    media_type_for,
    needs_conversion,
)
from ..errors import CacheError, InvalidError, LockedError, NotFoundError
from ..estargz import EStargzLayer, write_estargz
from ..remote import DescHandlers
from .blobs import (
    CHUNK,
    UNCOMPRESSED_LABEL,
    add_compression_blob,
    commit_written,
    compression_of,
    get_compression_blob,
    oci_desc,
    unlazy,
    write_layer,
)

if TYPE_CHECKING:
    from ._core import Core
    from .refs import _Record

log = logging.getLogger("pyctrd_cache.blobs")

# How long a conversion waits for another writer of its ingest.
_LOCKED_WAIT = 30.0


def ensure_compression(
    rec: _Record, dhs: DescHandlers, leased: Client, compression: Compression
) -> None:
    """Makes sure the record has a `compression` variant (a lazy blob that already is of
    that compression stays lazy)."""
    core = rec.core

    def ensure() -> None:
        desc = oci_desc(rec, dhs)
        if not needs_conversion(desc.media_type, desc.annotations, compression):
            if not rec.is_lazy():
                add_compression_blob(rec, desc, compression)
            return
        with contextlib.suppress(NotFoundError):
            get_compression_blob(rec, compression)
            return
        made = core.flight.do(f"convert-{desc.digest}-{compression.value}", lambda: make(desc))
        if made[0] is not rec:
            add_compression_blob(rec, made[1], compression)

    def make(desc: Descriptor) -> tuple[_Record, Descriptor]:
        # Records of one blob share its variants and the conversion's ingest: it runs once
        # across records and processes, and looks first for the variant another one made.
        # containerd's `locked` on the ingest is a writer this lock does not order (a
        # process of an older version): waited for, then the variant looked for again.
        deadline = time.monotonic() + _LOCKED_WAIT
        pause = 0.05
        while True:
            with contextlib.suppress(NotFoundError):
                return rec, get_compression_blob(rec, compression)
            unlazy(rec, desc, dhs.get(desc.digest))
            try:
                variant = convert(core, leased, desc, compression, rec.md.diff_id)
            except LockedError:
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            break
        add_compression_blob(rec, variant, compression)
        log.debug("made the %s variant %s of %s", compression.value, variant.digest, desc.digest)
        return rec, variant

    core.flight.do(f"compress-{rec.id}-{compression.value}", ensure)


def convert(
    core: Core, leased: Client, desc: Descriptor, target: Compression, diff_id: str
) -> Descriptor:
    """Streams the blob `desc` out of the content store, decompresses it, checks that it
    unpacks to `diff_id`, recompresses it as `target` and writes it back.

    An eStargz layer unpacks to a tar of its own (the landmark first, the table of contents
    last): its descriptor and its `containerd.io/uncompressed` label carry that tar's digest,
    and the descriptor the eStargz annotations.
    """
    source = compression_of(desc.media_type)
    chunks = decompressed_chunks(core.client.content.read(desc.digest), source)
    ingest = f"convert-{desc.digest}-{target.value}"
    if target is not Compression.ESTARGZ:
        return write_layer(leased, ingest, chunks, target, diff_id=diff_id)
    uncompressed = hashlib.sha256()
    compressed = hashlib.sha256()
    estargz_layers: list[EStargzLayer] = []

    def tee() -> Iterator[bytes]:
        for chunk in chunks:
            uncompressed.update(chunk)
            yield chunk

    def write_layer_estargz(put: Callable[[bytes], None]) -> None:
        with contextlib.closing(pipelined(tee())) as tar_chunks:
            tar = io.BufferedReader(ChunkReader(tar_chunks), CHUNK)
            sink = io.BufferedWriter(ChunkWriter(put), CHUNK)
            estargz_layers.append(write_estargz(tar, sink))
            sink.flush()
            # The writer stops at the end-of-archive marker: the rest still counts for the
            # diff id check.
            while tar.read(CHUNK):
                pass

    def compress() -> Iterator[bytes]:
        for chunk in produced(write_layer_estargz):
            compressed.update(chunk)
            yield chunk

    size = 0
    with leased.content.writer(ingest) as writer:
        if writer.offset:
            writer.truncate()
        try:
            # Reading and decompressing, rewriting, and writing run in threads of their own
            # (the eStargz writer pulls the tar from one more).
            for chunk in pipelined(compress()):
                size += len(chunk)
                writer.write(chunk)
            seen = "sha256:" + uncompressed.hexdigest()
            if seen != diff_id:
                raise InvalidError(
                    f"layer {desc.digest} decompresses to {seen}, not to its diff id {diff_id}"
                )
            digest = "sha256:" + compressed.hexdigest()
            annotations = estargz_layers[0].annotations()
            labels = {UNCOMPRESSED_LABEL: annotations[UNCOMPRESSED_LABEL]}
            commit_written(leased, writer, size=size, digest=digest, labels=labels)
        except BaseException:
            writer.close()
            with contextlib.suppress(CacheError):
                leased.content.abort(ingest)
            raise
    return Descriptor(media_type_for(target), digest, size, annotations)
