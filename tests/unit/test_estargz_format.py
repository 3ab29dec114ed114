"""The eStargz writer and reader: round trips of every entry type, the footer, the table of
contents, chunking, gzip compatibility, damaged blobs, and bounded memory."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tracemalloc
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import pytest

from pyctrd_cache import estargz
from pyctrd_cache.errors import InvalidError
from tests.layers import digest_of, make_tar

MTIME = 1_600_000_000


def _info(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = MTIME
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.uid, info.gid, info.uname, info.gname = 1000, 1000, "user", "group"
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def rich_tar(big: bytes) -> bytes:
    """A tar with every entry type eStargz describes, xattrs and a long name (PAX headers)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info("dir", tarfile.DIRTYPE))
        tar.addfile(_info("dir/small", size=5), io.BytesIO(b"hello"))
        tar.addfile(_info("dir/empty"))
        tar.addfile(_info("dir/big", size=len(big)), io.BytesIO(big))
        tar.addfile(_info("dir/link", tarfile.SYMTYPE, linkname="small"))
        tar.addfile(_info("dir/hard", tarfile.LNKTYPE, linkname="dir/small"))
        tar.addfile(_info("dir/fifo", tarfile.FIFOTYPE))
        tar.addfile(_info("dir/null", tarfile.CHRTYPE, devmajor=1, devminor=3))
        xattrs = {"SCHILY.xattr.user.note": "caf\u00e9", "SCHILY.xattr.security.capability": "x"}
        tar.addfile(_info("dir/attrs", size=3, pax_headers=xattrs), io.BytesIO(b"abc"))
        long_name = "dir/" + "n" * 150
        tar.addfile(_info(long_name, size=4), io.BytesIO(b"long"))
    return buf.getvalue()


def convert(tar: bytes, **options: int) -> tuple[bytes, estargz.EStargzLayer]:
    out = io.BytesIO()
    layer = estargz.write_estargz(io.BytesIO(tar), out, **options)
    return out.getvalue(), layer


def members(tar: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return [(m, t.extractfile(m).read() if m.isreg() else b"") for m in t]  # type: ignore[union-attr]


def summary(info: tarfile.TarInfo) -> tuple[object, ...]:
    return (
        info.name,
        info.type,
        info.size,
        info.mode,
        info.mtime,
        info.uid,
        info.gid,
        info.uname,
        info.gname,
        info.linkname,
        info.devmajor,
        info.devminor,
        sorted(info.pax_headers.items()),
    )


@pytest.fixture(scope="module")
def big() -> bytes:
    return os.urandom(3 * 1024 * 1024 + 12345)


def test_round_trip_keeps_every_entry(big: bytes) -> None:
    tar = rich_tar(big)
    blob, layer = convert(tar, chunk_size=1 << 20)
    plain = gzip.decompress(blob)

    got = members(plain)
    names = [m.name for m, _ in got]
    assert names[0] == estargz.NO_PREFETCH_LANDMARK
    assert got[0][1] == b"\x0f"
    assert names[-1] == estargz.TOC_NAME
    assert [(summary(m), d) for m, d in got[1:-1]] == [(summary(m), d) for m, d in members(tar)]

    assert layer.size == len(blob)
    assert layer.digest == digest_of(blob)
    assert layer.uncompressed_size == len(plain)
    assert layer.diff_id == digest_of(plain)
    assert layer.diff_id != digest_of(tar)
    assert json.loads(got[-1][1])["version"] == 1
    assert layer.toc_digest == digest_of(got[-1][1])
    assert layer.annotations() == {
        estargz.TOC_DIGEST_ANNOTATION: layer.toc_digest,
        estargz.UNCOMPRESSED_SIZE_ANNOTATION: str(len(plain)),
        "containerd.io/uncompressed": layer.diff_id,
    }


def test_toc_describes_entries_and_chunks(big: bytes) -> None:
    blob, layer = convert(rich_tar(big), chunk_size=1 << 20)
    toc = estargz.verify(io.BytesIO(blob), toc_digest=layer.toc_digest)
    assert toc.digest == layer.toc_digest
    by_name: dict[str, list[estargz.TOCEntry]] = {}
    for e in toc.entries:
        by_name.setdefault(e.name, []).append(e)

    chunks = by_name["dir/big"]
    assert [c.type for c in chunks] == ["reg", "chunk", "chunk", "chunk"]
    assert [c.chunk_offset for c in chunks] == [0, 1 << 20, 2 << 20, 3 << 20]
    assert [c.chunk_size for c in chunks] == [1 << 20, 1 << 20, 1 << 20, 0]
    assert chunks[0].size == len(big)
    assert chunks[0].digest == digest_of(big)
    assert chunks[1].chunk_digest == digest_of(big[1 << 20 : 2 << 20])
    for c in chunks:
        # Each chunk starts a gzip member of its own.
        raw = io.BytesIO(blob)
        raw.seek(c.offset)
        start = c.chunk_offset
        end = start + (c.chunk_size or len(big) - start)
        data = zlib.decompressobj(31).decompress(raw.read(), end - start)
        assert data == big[start:end]

    assert by_name["dir"][0].type == "dir"
    assert by_name["dir/link"][0].type == "symlink"
    assert by_name["dir/link"][0].link_name == "small"
    assert by_name["dir/hard"][0].type == "hardlink"
    assert by_name["dir/fifo"][0].type == "fifo"
    assert by_name["dir/null"][0].type == "char"
    empty = by_name["dir/empty"][0]
    assert (empty.size, empty.offset, empty.digest) == (0, 0, digest_of(b""))
    small = by_name["dir/small"][0]
    assert (small.mode, small.uid, small.gid) == (0o644, 1000, 1000)
    assert dict(by_name["dir/attrs"][0].xattrs) == {
        "security.capability": b"x",
        "user.note": "caf\u00e9".encode(),
    }
    assert "dir/" + "n" * 150 in by_name
    landmark = by_name[estargz.NO_PREFETCH_LANDMARK][0]
    assert (landmark.type, landmark.size, landmark.chunk_digest) == ("reg", 1, digest_of(b"\x0f"))


def test_toc_json_fields() -> None:
    blob, _ = convert(make_tar({"d/f": b"data"}))
    plain = gzip.decompress(blob)
    toc = json.loads(members(plain)[-1][1])
    f = next(e for e in toc["entries"] if e["name"] == "d/f")
    assert f == {
        "name": "d/f",
        "type": "reg",
        "size": 4,
        "modtime": "2020-09-13T12:26:40Z",
        "mode": 0o644,
        "offset": f["offset"],
        "chunkDigest": digest_of(b"data"),
        "digest": digest_of(b"data"),
    }


def test_footer() -> None:
    blob, _ = convert(make_tar({"a": b"1"}))
    footer = blob[-estargz.FOOTER_SIZE :]
    offset = estargz.parse_footer(footer)
    assert footer[16:38] == f"{offset:016x}STARGZ".encode()
    # The footer is an empty gzip member; the table of contents starts a member at `offset`.
    assert gzip.decompress(footer) == b""
    tail = gzip.decompress(blob[offset:])
    assert tarfile.TarInfo.frombuf(tail[:512], "utf-8", "strict").name == estargz.TOC_NAME
    assert tail.endswith(bytes(1024))
    assert estargz.is_estargz(io.BytesIO(blob))
    assert estargz.read_toc(io.BytesIO(blob)).offset == offset


@pytest.mark.skipif(shutil.which("gzip") is None, reason="needs gzip")
def test_gzip_tool_accepts_the_blob(tmp_path: object, big: bytes) -> None:
    blob, _ = convert(rich_tar(big), chunk_size=1 << 20)
    result = subprocess.run(["gzip", "-t"], input=blob, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr
    out = subprocess.run(["gzip", "-dc"], input=blob, capture_output=True, check=True).stdout
    assert out == gzip.decompress(blob)


def test_converting_twice_keeps_one_toc_and_landmark() -> None:
    first, _ = convert(make_tar({"a": b"1", "b": b"2"}))
    second, layer = convert(gzip.decompress(first))
    names = [m.name for m, _ in members(gzip.decompress(second))]
    assert names == [estargz.NO_PREFETCH_LANDMARK, "a", "b", estargz.TOC_NAME]
    estargz.verify(io.BytesIO(second), toc_digest=layer.toc_digest)


def test_plain_gzip_is_not_estargz() -> None:
    plain = gzip.compress(make_tar({"a": b"1"}))
    assert not estargz.is_estargz(io.BytesIO(plain))
    assert not estargz.is_estargz(io.BytesIO(b"short"))
    with pytest.raises(InvalidError, match="eStargz footer"):
        estargz.read_toc(io.BytesIO(plain))


def test_verify_detects_damage() -> None:
    blob, layer = convert(make_tar({"a": b"x" * 10_000}))
    with pytest.raises(InvalidError, match="table of contents is"):
        estargz.verify(io.BytesIO(blob), toc_digest="sha256:" + "0" * 64)

    toc = estargz.read_toc(io.BytesIO(blob))
    entry = next(e for e in toc.entries if e.name == "a")
    damaged = bytearray(blob)
    damaged[entry.offset + 12] ^= 0xFF
    with pytest.raises(InvalidError, match="chunk of 'a'"):
        estargz.verify(io.BytesIO(bytes(damaged)), toc_digest=layer.toc_digest)


@pytest.mark.parametrize(
    ("tar", "message"),
    [
        (b"not a tar" * 100, "invalid header"),
        (make_tar({"a": b"12345"})[:700], "ends in the middle"),
    ],
    ids=["garbage", "truncated"],
)
def test_bad_input_is_an_invalid_error(tar: bytes, message: str) -> None:
    with pytest.raises(InvalidError, match=message):
        convert(tar)


def test_bad_chunk_size() -> None:
    with pytest.raises(InvalidError, match="chunk size"):
        convert(make_tar({"a": b"1"}), chunk_size=0)


def test_unsupported_entry_type() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(_info("contiguous", tarfile.GNUTYPE_SPARSE))
    with pytest.raises(InvalidError, match="cannot describe"):
        convert(buf.getvalue())


class _Layer(io.RawIOBase):
    """A 64 MiB layer tar generated on the fly: files of 1 MiB of pseudo-random bytes."""

    def __init__(self, files: int) -> None:
        self._parts = self._generate(files)
        self._buffer = b""

    @staticmethod
    def _generate(files: int) -> Iterator[bytes]:
        for i in range(files):
            info = tarfile.TarInfo(f"f{i}")
            info.size = 1 << 20
            yield info.tobuf(tarfile.PAX_FORMAT)
            seed = hashlib.sha256(str(i).encode()).digest()
            yield seed * (info.size // len(seed))
        yield bytes(1024)

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            part = next(self._parts, None)
            if part is None:
                return 0
            self._buffer = part
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.size += len(b)
        return len(b)


def test_memory_stays_bounded_for_a_64_mib_layer() -> None:
    src: BinaryIO = io.BufferedReader(_Layer(64))
    sink = _Sink()
    tracemalloc.start()
    try:
        layer = estargz.write_estargz(src, sink, chunk_size=4 << 20)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert layer.uncompressed_size > 64 << 20
    assert layer.size == sink.size
    assert peak < 16 << 20, f"peak {peak / (1 << 20):.1f} MiB"
