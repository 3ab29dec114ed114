"""Layer compressions: media types, detection and streaming conversion (BuildKit's
util/compression and cache/converter.go).

eStargz is gzip on the wire (its media type is the gzip one): a gzip layer is eStargz when its
descriptor carries the table of contents' digest annotation.

Conversion streams a blob out of the content store, decompresses it, checks the
uncompressed digest against the layer's diff id, recompresses it with a C codec (zlib for
gzip, the zstandard package for zstd) and streams the result back, never holding a layer in
memory.
"""

from __future__ import annotations

import enum
import hashlib
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, Protocol

import zstandard

from . import _validate
from .errors import InvalidError
from .estargz import TOC_DIGEST_ANNOTATION

__all__ = [
    "Compression",
    "chain_id",
    "compressed_chunks",
    "decompressed_chunks",
    "detect",
    "from_descriptor",
    "from_media_type",
    "media_type_for",
    "needs_conversion",
    "parse_digest",
]

OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP: Final = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD: Final = OCI_LAYER + "+zstd"
_OCI_NONDIST: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER_LAYER: Final = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP: Final = DOCKER_LAYER + ".gzip"
_DOCKER_FOREIGN_GZIP: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
_DOCKER_LAYER_ZSTD: Final = DOCKER_LAYER + ".zstd"

_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


class Compression(enum.Enum):
    """How a layer blob is compressed; values as BuildKit spells them."""

    UNCOMPRESSED = "uncompressed"
    GZIP = "gzip"
    ZSTD = "zstd"
    ESTARGZ = "estargz"


_BY_MEDIA_TYPE: Final = {
    OCI_LAYER: Compression.UNCOMPRESSED,
    _OCI_NONDIST: Compression.UNCOMPRESSED,
    DOCKER_LAYER: Compression.UNCOMPRESSED,
    OCI_LAYER_GZIP: Compression.GZIP,
    _OCI_NONDIST + "+gzip": Compression.GZIP,
    DOCKER_LAYER_GZIP: Compression.GZIP,
    _DOCKER_FOREIGN_GZIP: Compression.GZIP,
    OCI_LAYER_ZSTD: Compression.ZSTD,
    _OCI_NONDIST + "+zstd": Compression.ZSTD,
    _DOCKER_LAYER_ZSTD: Compression.ZSTD,
}

_MEDIA_TYPE: Final = {
    Compression.UNCOMPRESSED: OCI_LAYER,
    Compression.GZIP: OCI_LAYER_GZIP,
    Compression.ZSTD: OCI_LAYER_ZSTD,
    Compression.ESTARGZ: OCI_LAYER_GZIP,
}


def from_media_type(media_type: str) -> Compression | None:
    """The compression of a layer media type; None for a type that is not a known layer."""
    return _BY_MEDIA_TYPE.get(media_type)


def from_descriptor(media_type: str, annotations: Mapping[str, str]) -> Compression | None:
    """The compression of a layer: eStargz for a gzip layer annotated with a table of
    contents' digest, else that of its media type (None for a type that is not a layer)."""
    compression = from_media_type(media_type)
    if compression is Compression.GZIP and TOC_DIGEST_ANNOTATION in annotations:
        return Compression.ESTARGZ
    return compression


def media_type_for(compression: Compression) -> str:
    """The OCI layer media type written for `compression`."""
    return _MEDIA_TYPE[compression]


def needs_conversion(
    media_type: str, annotations: Mapping[str, str], compression: Compression
) -> bool:
    """Whether a layer of `media_type` and `annotations` must be converted to serve as
    `compression`. An eStargz layer serves as gzip too."""
    current = from_descriptor(media_type, annotations)
    if current is None:
        return False  # not a layer: never converted
    if compression is Compression.GZIP and current is Compression.ESTARGZ:
        return False
    return current is not compression


def detect(head: bytes) -> Compression:
    """The compression of a layer stream from its first bytes (magic numbers)."""
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    return Compression.UNCOMPRESSED


def parse_digest(value: str, *, what: str = "digest") -> str:
    """`value` if it is a well-formed sha256 digest, else `InvalidError`."""
    return _validate.digest(value, what=what)


def chain_id(parent: str, child: str) -> str:
    """The OCI image-spec chain id of `child` on `parent` (sha256 of "parent child")."""
    return "sha256:" + hashlib.sha256(f"{parent} {child}".encode()).hexdigest()


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes | memoryview) -> bytes: ...


# The compressed bytes fed to a decompressor at a time, so that one call's output stays
# bounded whatever the input (a compression bomb): a zstd block of at most 128 KiB takes at
# least 4 bytes, so 256 bytes give at most 8 MiB; deflate expands at most 1032 times, so
# 8 KiB give at most 8.1 MiB. The output is passed on in pieces of about `_OUTPUT` bytes.
_ZSTD_STEP: Final = 256
_GZIP_STEP: Final = 8 << 10
_OUTPUT: Final = 1 << 20


def _steps(chunks: Iterable[bytes], step: int) -> Iterator[memoryview]:
    for chunk in chunks:
        view = memoryview(chunk)
        for i in range(0, len(view), step):
            yield view[i : i + step]


def decompressed_chunks(chunks: Iterable[bytes], compression: Compression) -> Iterator[bytes]:
    """The uncompressed tar stream of a layer given as compressed chunks, decompressed in
    steps of bounded output (a compression bomb costs time, not memory).

    A truncated or corrupt stream raises `InvalidError`.
    """
    if compression is Compression.UNCOMPRESSED:
        yield from chunks
        return
    try:
        new: Callable[[], _Decompressor]
        if compression is Compression.ZSTD:
            new = zstandard.ZstdDecompressor().decompressobj
            step = _ZSTD_STEP
        else:

            def new() -> _Decompressor:
                return zlib.decompressobj(wbits=31)

            step = _GZIP_STEP
        d = new()
        started = False  # whether the current frame (gzip member) has had any input
        frames = 0
        output = bytearray()
        for piece in _steps(chunks, step):
            chunk: bytes | memoryview = piece
            while chunk:
                started = True
                output += d.decompress(chunk)
                if len(output) >= _OUTPUT:
                    yield bytes(output)
                    output.clear()
                if not d.eof:
                    break
                # The next frame: eStargz layers are many gzip members.
                frames += 1
                chunk = d.unused_data
                d = new()
                started = False
        if started or frames == 0:
            raise InvalidError(f"{compression.value} layer stream ends early")
        if output:
            yield bytes(output)
    except (zlib.error, zstandard.ZstdError) as err:
        raise InvalidError(f"corrupt {compression.value} layer: {err}") from None


# zstd compresses on worker threads, one per core: its output is the same for any number of
# workers (one or more), so a layer's zstd blob does not depend on the machine that made it.
_ZSTD_LEVEL: Final = 3
_ZSTD_THREADS: Final = -1


def compressed_chunks(chunks: Iterable[bytes], compression: Compression) -> Iterator[bytes]:
    """The layer stream compressed as uncompressed, gzip or zstd (eStargz needs the whole
    tar's structure: `estargz.write_estargz` writes it). zstd runs on worker threads of the
    codec's own, at level 3; gzip is zlib at level 6 on the calling thread."""
    if compression is Compression.UNCOMPRESSED:
        yield from chunks
        return
    compress: Callable[[bytes], bytes]
    flush: Callable[[], bytes]
    if compression is Compression.GZIP:
        z = zlib.compressobj(level=6, wbits=31)
        compress, flush = z.compress, z.flush
    elif compression is Compression.ZSTD:
        zc = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, threads=_ZSTD_THREADS).compressobj()
        compress, flush = zc.compress, zc.flush
    else:
        raise AssertionError(compression)
    for chunk in chunks:
        if out := compress(chunk):
            yield out
    yield flush()
