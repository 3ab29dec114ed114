"""eStargz layers: a gzip layer that can also be read one file at a time.

The format follows the eStargz specification of the stargz-snapshotter project:

* the blob is a concatenation of gzip members, so it is an ordinary `tar+gzip` layer;
* the payload of each non-empty regular file starts a new member, and is cut into chunks of
  at most `chunk_size` bytes, each chunk its own member;
* the tar's last entry is the table of contents, `stargz.index.json`, in a member of its own
  together with the tar's end-of-archive blocks; its JSON lists every entry and chunk with the
  offset of the chunk's gzip member in the blob and the chunk's sha256;
* a 51-byte empty gzip member, the footer, ends the blob; its Extra field holds
  `%016xSTARGZ` with the offset of the table of contents' member;
* with no prioritized files, the first entry is the landmark `.no.prefetch.landmark`, a regular
  file of one byte, 0xf.

Tar headers are copied from the source unchanged, so the decompressed blob is the source's
entries (without an earlier table of contents or landmark), the landmark first and the table of
contents last. Its sha256 is the layer's own diff id, not the source tar's.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import posixpath
import struct
import tarfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, Final

from pyctrd_cache.errors import InvalidError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FOOTER_SIZE",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TOC_DIGEST_ANNOTATION",
    "TOC_NAME",
    "UNCOMPRESSED_SIZE_ANNOTATION",
    "EStargzLayer",
    "TOCEntry",
    "TableOfContents",
    "is_estargz",
    "parse_footer",
    "read_toc",
    "verify",
    "write_estargz",
]

DEFAULT_CHUNK_SIZE: Final = 4 << 20
FOOTER_SIZE: Final = 51
TOC_NAME: Final = "stargz.index.json"
NO_PREFETCH_LANDMARK: Final = ".no.prefetch.landmark"
PREFETCH_LANDMARK: Final = ".prefetch.landmark"
TOC_DIGEST_ANNOTATION: Final = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION: Final = "io.containers.estargz.uncompressed-size"

_BLOCK: Final = 512
_LANDMARK_CONTENT: Final = b"\x0f"
_FOOTER_MAGIC: Final = b"STARGZ"
# gzip header with FEXTRA, mtime 0, XFL 0, OS unknown; XLEN 26; subfield "SG" of 22 bytes.
_FOOTER_HEAD: Final = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", 26) + b"SG"
# An empty final stored deflate block, then CRC32 and ISIZE of nothing.
_FOOTER_TAIL: Final = b"\x01\x00\x00\xff\xff" + bytes(8)
# pax extended, pax global, GNU long name and GNU long link records describe the entry after them.
_PREFIX_TYPES: Final = frozenset(b"xgLK")
_MAX_PREFIX: Final = 1 << 20
_COPY: Final = 1 << 20
_TYPES: Final = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
_XATTR_PREFIX: Final = "SCHILY.xattr."


@dataclass(frozen=True)
class EStargzLayer:
    """What `write_estargz` wrote: the blob's digest and size, the annotations' values and the
    diff id (sha256 of the decompressed blob)."""

    digest: str
    size: int
    toc_digest: str
    uncompressed_size: int
    diff_id: str

    def annotations(self) -> dict[str, str]:
        """The layer descriptor's annotations, `containerd.io/uncompressed` included."""
        return {
            TOC_DIGEST_ANNOTATION: self.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size),
            "containerd.io/uncompressed": self.diff_id,
        }


@dataclass(frozen=True)
class TOCEntry:
    """One entry of a table of contents; `offset` and the chunk fields are set for the chunks
    of non-empty regular files (`type` "reg" for the first, "chunk" for the others)."""

    name: str
    type: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    link_name: str = ""
    digest: str = ""
    offset: int = 0
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class TableOfContents:
    digest: str
    offset: int
    entries: tuple[TOCEntry, ...]


def _sha256(h: Any) -> str:
    return "sha256:" + str(h.hexdigest())


class _Output:
    """The blob being written: gzip members over `dst`, counting and hashing both sides."""

    def __init__(self, dst: BinaryIO, level: int) -> None:
        self._dst = dst
        self._level = level
        self._member: Any = None
        self.offset = 0
        self.blob_hash = hashlib.sha256()
        self.tar_hash = hashlib.sha256()
        self.tar_size = 0

    def _emit(self, data: bytes) -> None:
        if data:
            self._dst.write(data)
            self.blob_hash.update(data)
            self.offset += len(data)

    def write(self, data: bytes) -> None:
        """Appends tar bytes to the open member, opening one if none is."""
        if self._member is None:
            self._member = zlib.compressobj(self._level, zlib.DEFLATED, 31)
        self.tar_hash.update(data)
        self.tar_size += len(data)
        self._emit(self._member.compress(data))

    def close_member(self) -> None:
        if self._member is not None:
            self._emit(self._member.flush())
            self._member = None

    def raw(self, data: bytes) -> None:
        """Appends bytes that are not part of the tar (the footer); no member may be open."""
        self._emit(data)


class _Source:
    """The source tar, read block by block."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src

    def read(self, n: int, what: str) -> bytes:
        out = bytearray()
        while len(out) < n:
            got = self._src.read(n - len(out))
            if not got:
                raise InvalidError(f"the layer tar ends in the middle of {what}")
            out += got
        return bytes(out)

    def read_padded(self, n: int, what: str) -> bytes:
        data = self.read(n, what)
        self.read(-n % _BLOCK, what)
        return data


def _parse_header(raw: bytes) -> tarfile.TarInfo:
    try:
        member = tarfile.TarFile(fileobj=io.BytesIO(raw + bytes(2 * _BLOCK))).next()
    except tarfile.TarError as e:
        raise InvalidError(f"the layer tar has an invalid header: {e}") from None
    if member is None:
        raise InvalidError("the layer tar has an invalid header")
    return member


def _header_size(block: bytes) -> int:
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape").size
    except tarfile.TarError as e:
        raise InvalidError(f"the layer tar has an invalid header: {e}") from None


def _modtime(mtime: float) -> str:
    seconds = round(mtime)
    if seconds == 0:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _entry_json(info: tarfile.TarInfo, kind: str) -> dict[str, Any]:
    """The TOC fields of `info` that do not depend on its payload."""
    entry: dict[str, Any] = {"name": info.name, "type": kind}
    if kind == "reg" and info.size:
        entry["size"] = info.size
    if modtime := _modtime(info.mtime):
        entry["modtime"] = modtime
    if kind in ("symlink", "hardlink"):
        entry["linkName"] = info.linkname
    for key, value in (
        ("mode", info.mode),
        ("uid", info.uid),
        ("gid", info.gid),
        ("userName", info.uname),
        ("groupName", info.gname),
    ):
        if value:
            entry[key] = value
    if kind in ("char", "block"):
        entry["devMajor"] = info.devmajor
        entry["devMinor"] = info.devminor
    xattrs = {
        key[len(_XATTR_PREFIX) :]: base64.b64encode(
            value.encode("utf-8", "surrogateescape")
        ).decode()
        for key, value in sorted(info.pax_headers.items())
        if key.startswith(_XATTR_PREFIX)
    }
    if xattrs:
        entry["xattrs"] = xattrs
    return entry


def _write_payload(
    source: _Source,
    out: _Output,
    entry: dict[str, Any],
    size: int,
    chunk_size: int,
    toc: list[dict[str, Any]],
) -> None:
    """Copies a regular file's payload, each chunk in a member of its own, and adds its TOC
    entries; the member of the last chunk stays open for the padding and the next headers."""
    file_hash = hashlib.sha256()
    done = 0
    current = entry
    while done < size:
        length = min(chunk_size, size - done)
        out.close_member()
        current["offset"] = out.offset
        if done:
            current["chunkOffset"] = done
        if length < size - done:
            current["chunkSize"] = length
        chunk_hash = hashlib.sha256()
        left = length
        while left:
            data = source.read(min(left, _COPY), f"the payload of {entry['name']!r}")
            out.write(data)
            chunk_hash.update(data)
            file_hash.update(data)
            left -= len(data)
        current["chunkDigest"] = _sha256(chunk_hash)
        toc.append(current)
        done += length
        current = {"name": entry["name"], "type": "chunk"}
    entry["digest"] = _sha256(file_hash)
    out.write(bytes(-size % _BLOCK))
    source.read(-size % _BLOCK, f"the payload of {entry['name']!r}")


def _file_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT)


def _skip(source: _Source, info: tarfile.TarInfo) -> None:
    left = info.size + (-info.size % _BLOCK) if info.isreg() else 0
    while left:
        n = min(left, _COPY)
        source.read(n, f"the payload of {info.name!r}")
        left -= n


def write_estargz(
    src: BinaryIO, dst: BinaryIO, *, chunk_size: int = DEFAULT_CHUNK_SIZE, level: int = 6
) -> EStargzLayer:
    """Writes the eStargz form of the uncompressed layer tar read from `src` to `dst`.

    Reads and writes sequentially, holding at most a megabyte of payload at a time.
    InvalidError if `src` is not a tar or has an entry eStargz cannot describe (sparse files,
    unknown types); `dst` then holds a partial blob the caller discards.
    """
    if chunk_size <= 0:
        raise InvalidError(f"the eStargz chunk size must be positive, not {chunk_size}")
    source = _Source(src)
    out = _Output(dst, level)
    toc: list[dict[str, Any]] = []

    out.write(_file_header(NO_PREFETCH_LANDMARK, len(_LANDMARK_CONTENT)))
    landmark: dict[str, Any] = {"name": NO_PREFETCH_LANDMARK, "type": "reg", "size": 1}
    toc.append(landmark)
    _write_payload(
        _Source(io.BytesIO(_LANDMARK_CONTENT + bytes(_BLOCK - 1))), out, landmark, 1, 1, []
    )

    while True:
        first = src.read(_BLOCK)
        if not first:
            break
        block = (
            first + source.read(_BLOCK - len(first), "a header") if len(first) < _BLOCK else first
        )
        if block == bytes(_BLOCK):
            break
        raw = bytearray()
        while block[156] in _PREFIX_TYPES:
            size = _header_size(block)
            if len(raw) + size > _MAX_PREFIX:
                raise InvalidError("the layer tar has extended headers of more than 1 MiB")
            raw += block + source.read_padded(size, "an extended header")
            raw += bytes(-size % _BLOCK)
            block = source.read(_BLOCK, "a header")
        raw += block
        info = _parse_header(bytes(raw))
        kind = _TYPES.get(info.type)
        if kind is None:
            raise InvalidError(
                f"the layer tar's entry {info.name!r} has type {info.type!r},"
                " which eStargz cannot describe"
            )
        clean = posixpath.normpath("/" + info.name).lstrip("/")
        if clean in (TOC_NAME, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK):
            _skip(source, info)
            continue
        out.write(bytes(raw))
        entry = _entry_json(info, kind)
        if kind == "reg" and info.size:
            _write_payload(source, out, entry, info.size, chunk_size, toc)
        else:
            if kind == "reg":
                entry["digest"] = _sha256(hashlib.sha256())
            toc.append(entry)
    out.close_member()

    toc_offset = out.offset
    toc_json = json.dumps({"version": 1, "entries": toc}, indent="\t").encode()
    out.write(_file_header(TOC_NAME, len(toc_json)))
    out.write(toc_json + bytes(-len(toc_json) % _BLOCK) + bytes(2 * _BLOCK))
    out.close_member()
    out.raw(_footer(toc_offset))
    return EStargzLayer(
        digest=_sha256(out.blob_hash),
        size=out.offset,
        toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest(),
        uncompressed_size=out.tar_size,
        diff_id=_sha256(out.tar_hash),
    )


def _footer(toc_offset: int) -> bytes:
    subfield = f"{toc_offset:016x}".encode() + _FOOTER_MAGIC
    return _FOOTER_HEAD + struct.pack("<H", len(subfield)) + subfield + _FOOTER_TAIL


def parse_footer(footer: bytes) -> int:
    """The offset of the table of contents in an eStargz blob ending with `footer`;
    InvalidError if those 51 bytes are not an eStargz footer."""
    if len(footer) != FOOTER_SIZE:
        raise InvalidError(f"an eStargz footer has {FOOTER_SIZE} bytes, not {len(footer)}")
    head = len(_FOOTER_HEAD)
    if (
        footer[:4] != _FOOTER_HEAD[:4]
        or footer[10:head] != _FOOTER_HEAD[10:]
        or footer[head : head + 2] != struct.pack("<H", 22)
        or footer[head + 18 : head + 24] != _FOOTER_MAGIC
    ):
        raise InvalidError("the blob does not end with an eStargz footer")
    member = zlib.decompressobj(31)
    try:
        rest = member.decompress(footer)
    except zlib.error as e:
        raise InvalidError(f"the eStargz footer is not a gzip member: {e}") from None
    if rest or not member.eof or member.unused_data:
        raise InvalidError("the eStargz footer is not an empty gzip member")
    digits = footer[head + 2 : head + 18].decode("ascii", "replace")
    try:
        return int(digits, 16)
    except ValueError:
        raise InvalidError(f"the eStargz footer's offset {digits!r} is not hexadecimal") from None


def _size(blob: BinaryIO) -> int:
    return blob.seek(0, io.SEEK_END)


def is_estargz(blob: BinaryIO) -> bool:
    """Whether the seekable gzip `blob` ends with an eStargz footer."""
    size = _size(blob)
    if size < FOOTER_SIZE:
        return False
    blob.seek(size - FOOTER_SIZE)
    try:
        offset = parse_footer(blob.read(FOOTER_SIZE))
    except InvalidError:
        return False
    return offset < size - FOOTER_SIZE


def _entry(raw: Any) -> TOCEntry:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise InvalidError("the eStargz table of contents has an entry without a name")
    try:
        return TOCEntry(
            name=raw["name"],
            type=str(raw.get("type", "")),
            size=int(raw.get("size", 0)),
            mode=int(raw.get("mode", 0)),
            uid=int(raw.get("uid", 0)),
            gid=int(raw.get("gid", 0)),
            link_name=str(raw.get("linkName", "")),
            digest=str(raw.get("digest", "")),
            offset=int(raw.get("offset", 0)),
            chunk_offset=int(raw.get("chunkOffset", 0)),
            chunk_size=int(raw.get("chunkSize", 0)),
            chunk_digest=str(raw.get("chunkDigest", "")),
            xattrs=tuple(
                (k, base64.b64decode(v)) for k, v in sorted(raw.get("xattrs", {}).items())
            ),
        )
    except (TypeError, ValueError, AttributeError) as e:
        raise InvalidError(f"the eStargz TOC entry {raw['name']!r} is malformed: {e}") from None


def read_toc(blob: BinaryIO) -> TableOfContents:
    """The table of contents of the seekable eStargz `blob`; InvalidError if it has none."""
    size = _size(blob)
    if size < FOOTER_SIZE:
        raise InvalidError("the blob is too small to be eStargz")
    blob.seek(size - FOOTER_SIZE)
    offset = parse_footer(blob.read(FOOTER_SIZE))
    if offset >= size - FOOTER_SIZE:
        raise InvalidError(f"the eStargz footer points past the blob: {offset}")
    blob.seek(offset)
    member = zlib.decompressobj(31)
    try:
        tar = member.decompress(blob.read(size - FOOTER_SIZE - offset))
    except zlib.error as e:
        raise InvalidError(f"the eStargz table of contents is not a gzip member: {e}") from None
    if not member.eof or member.unused_data:
        raise InvalidError("the eStargz table of contents is not one gzip member before the footer")
    try:
        info = tarfile.TarInfo.frombuf(tar[:_BLOCK], "utf-8", "surrogateescape")
    except tarfile.TarError as e:
        raise InvalidError(f"the eStargz table of contents has no tar header: {e}") from None
    if info.name != TOC_NAME:
        raise InvalidError(f"the eStargz table of contents is named {info.name!r}")
    toc_json = tar[_BLOCK : _BLOCK + info.size]
    try:
        toc = json.loads(toc_json)
    except ValueError as e:
        raise InvalidError(f"the eStargz table of contents is not JSON: {e}") from None
    if not isinstance(toc, dict) or toc.get("version") != 1:
        raise InvalidError("the eStargz table of contents is not of version 1")
    entries = toc.get("entries")
    if not isinstance(entries, list):
        raise InvalidError("the eStargz table of contents has no entries")
    return TableOfContents(
        digest="sha256:" + hashlib.sha256(toc_json).hexdigest(),
        offset=offset,
        entries=tuple(_entry(e) for e in entries),
    )


def _read_chunk(blob: BinaryIO, entry: TOCEntry, length: int, *hashes: Any) -> None:
    """Feeds the first `length` bytes the gzip member at `entry.offset` decompresses to into
    `hashes`."""
    blob.seek(entry.offset)
    member = zlib.decompressobj(31)
    left = length
    try:
        while left and not member.eof:
            data = blob.read(_COPY)
            if not data:
                break
            while data and left:
                out = member.decompress(data, left)
                data = member.unconsumed_tail
                for h in hashes:
                    h.update(out)
                left -= len(out)
                if member.eof:
                    break
    except zlib.error as e:
        raise InvalidError(f"the eStargz chunk of {entry.name!r} is not gzip: {e}") from None
    if left:
        raise InvalidError(f"the eStargz chunk of {entry.name!r} at {entry.offset} is short")


def verify(blob: BinaryIO, *, toc_digest: str = "") -> TableOfContents:
    """Checks the seekable eStargz `blob`: its footer, its table of contents (against
    `toc_digest` when given), and every chunk and regular file against their digests.

    InvalidError names the first thing that does not match.
    """
    toc = read_toc(blob)
    if toc_digest and toc.digest != toc_digest:
        raise InvalidError(f"the eStargz table of contents is {toc.digest}, not {toc_digest}")
    file: TOCEntry | None = None
    file_hash = hashlib.sha256()
    for entry in toc.entries:
        if entry.type == "reg":
            file, file_hash = entry, hashlib.sha256()
            if entry.size == 0:
                if entry.digest and entry.digest != _sha256(file_hash):
                    raise InvalidError(f"the empty file {entry.name!r} has digest {entry.digest}")
                continue
        elif entry.type != "chunk":
            continue
        elif file is None or file.name != entry.name or entry.chunk_offset == 0:
            raise InvalidError(f"the eStargz chunk of {entry.name!r} follows no part of its file")
        length = entry.chunk_size or file.size - entry.chunk_offset
        if length <= 0 or entry.chunk_offset + length > file.size:
            raise InvalidError(f"the eStargz chunk of {entry.name!r} has a bad size")
        chunk_hash = hashlib.sha256()
        _read_chunk(blob, entry, length, chunk_hash, file_hash)
        if entry.chunk_digest and _sha256(chunk_hash) != entry.chunk_digest:
            raise InvalidError(f"the eStargz chunk of {entry.name!r} at {entry.offset} differs")
        last = entry.chunk_offset + length == file.size
        if last and file.digest and _sha256(file_hash) != file.digest:
            raise InvalidError(f"the eStargz file {entry.name!r} differs from its digest")
    return toc
