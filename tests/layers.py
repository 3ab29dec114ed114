"""Layer tars made in memory for the tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from typing import BinaryIO

import zstandard

from pyctrd_cache.client import Descriptor
from pyctrd_cache.errors import NotFoundError

TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZIP = TAR + "+gzip"
TAR_ZSTD = TAR + "+zstd"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of regular files (parent directories included), fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name, data in sorted(files.items()):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    info.mtime = 1_600_000_000
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(tar: bytes, media_type: str) -> bytes:
    if media_type == TAR_GZIP:
        return gzip.compress(tar, mtime=0)
    if media_type == TAR_ZSTD:
        return zstandard.ZstdCompressor().compress(tar)
    return tar


def descriptor(blob: bytes, media_type: str, diff_id: str | None = None) -> Descriptor:
    annotations = {"containerd.io/uncompressed": diff_id} if diff_id else {}
    return Descriptor(media_type, digest_of(blob), len(blob), annotations)


def layer(files: dict[str, bytes], media_type: str = TAR_GZIP) -> tuple[bytes, Descriptor]:
    """A layer blob of `files` and its descriptor, diff id annotated."""
    tar = make_tar(files)
    blob = compress(tar, media_type)
    return blob, descriptor(blob, media_type, digest_of(tar))


def decompress(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return blob


class BytesProvider:
    """A provider over blobs held in memory; counts how often each was opened."""

    def __init__(self, *blobs: bytes) -> None:
        self.blobs = {digest_of(b): b for b in blobs}
        self.opened: dict[str, int] = {}

    def add(self, blob: bytes) -> None:
        self.blobs[digest_of(blob)] = blob

    def open(self, desc: Descriptor) -> BinaryIO:
        if desc.digest not in self.blobs:
            raise NotFoundError(f"no blob {desc.digest}")
        self.opened[desc.digest] = self.opened.get(desc.digest, 0) + 1
        return io.BytesIO(self.blobs[desc.digest])
