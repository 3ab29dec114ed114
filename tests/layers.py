"""Layer tars made in memory for the tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import zstandard

from pyctrd_cache.client import Descriptor

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


def descriptor(blob: bytes, media_type: str) -> Descriptor:
    return Descriptor(media_type=media_type, digest=digest_of(blob), size=len(blob))
