"""The files of an OCI image layout, reached without following symlinks.

A layout is not trusted: it may hold symlinks aimed at files or directories outside it (a
user's Docker config, a root-only file, `/dev/zero`), FIFOs that block a reader, or files
of any size. So the layout directory is opened once (it is the caller's choice, a symlink
to it is followed) and every entry below it is reached from a directory descriptor, one
name at a time, with `O_NOFOLLOW`:

- an entry that is a symlink is refused (`InvalidError`), whether it is a file or a
  directory on the way;
- a file read must be a regular file, checked before it is opened (a FIFO or device is
  never opened) and again on the open descriptor;
- a read is capped, and refused when the file is larger than the cap;
- a file is written to a new temporary file in its own directory
  (`O_CREAT | O_EXCL | O_NOFOLLOW`), synced and renamed over the name, so the rename
  replaces a name in the layout and never writes through a link.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pathlib
import secrets
import stat
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO, Final

from .compression import parse_digest
from .errors import InvalidError

_DIRECTORY_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_MODE: Final = 0o644
_CHUNK: Final = 1 << 20


def blob_parts(digest: str) -> tuple[str, str, str]:
    """The path components of the blob of `digest` below a layout (checked to be sha256)."""
    algorithm, _, hex_digest = parse_digest(digest).partition(":")
    return ("blobs", algorithm, hex_digest)


class LayoutFiles:
    """The entries below `root`, named by their path components."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root

    def path(self, parts: Sequence[str]) -> pathlib.Path:
        return self.root.joinpath(*parts)

    def _refused(self, parts: Sequence[str], what: str) -> InvalidError:
        return InvalidError(
            f"{self.path(parts)} is {what}; an OCI layout's entries must be regular files and "
            "directories, not symlinks"
        )

    @contextlib.contextmanager
    def directory(self, parts: Sequence[str], *, create: bool = False) -> Iterator[int]:
        """A descriptor of the directory `parts` (made when missing with `create`);
        `FileNotFoundError` when it is missing."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, name in enumerate(parts):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=fd)
                try:
                    child = os.open(name, _DIRECTORY_FLAGS, dir_fd=fd)
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self._refused(
                            parts[: i + 1], "a symlink or not a directory"
                        ) from None
                    raise
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def stat(self, parts: Sequence[str]) -> os.stat_result:
        """The regular file's status; `FileNotFoundError` when it is missing."""
        with self.directory(parts[:-1]) as fd:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise self._refused(parts, "a symlink" if stat.S_ISLNK(st.st_mode) else "not a file")
        return st

    def open(self, parts: Sequence[str]) -> BinaryIO:
        """The regular file, open for reading; `FileNotFoundError` when it is missing."""
        with self.directory(parts[:-1]) as fd:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise self._refused(
                    parts, "a symlink" if stat.S_ISLNK(st.st_mode) else "not a file"
                )
            try:
                file_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise self._refused(parts, "a symlink") from None
                raise
        opened = os.fstat(file_fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (
            st.st_dev,
            st.st_ino,
        ):
            os.close(file_fd)
            raise self._refused(parts, "not a file (it changed while it was opened)")
        os.set_blocking(file_fd, True)
        return os.fdopen(file_fd, "rb")

    def read(self, parts: Sequence[str], limit: int) -> bytes:
        """The regular file's bytes; `InvalidError` when it holds more than `limit`."""
        with self.open(parts) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidError(f"{self.path(parts)} is larger than {limit} bytes")
        return data

    def write(self, parts: Sequence[str], chunks: Iterable[bytes]) -> None:
        """Writes `chunks` to a new temporary file next to `parts`, syncs it and renames it
        over the name (the temporary file is removed on error)."""
        with self.directory(parts[:-1], create=True) as fd:
            tmp = f".{parts[-1][:16]}-{secrets.token_hex(8)}.tmp"
            file_fd = os.open(tmp, _NEW_FILE_FLAGS, _FILE_MODE, dir_fd=fd)
            try:
                with os.fdopen(file_fd, "wb") as out:
                    for chunk in chunks:
                        out.write(chunk)
                    out.flush()
                    os.fchmod(out.fileno(), _FILE_MODE)
                    os.fsync(out.fileno())
                os.replace(tmp, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)
                raise

    def matches(self, parts: Sequence[str], size: int, digest: str) -> bool:
        """Whether the file exists, is regular, and has `size` bytes of digest `digest`
        (`algorithm:hex`)."""
        try:
            if self.stat(parts).st_size != size:
                return False
            hasher = hashlib.new(digest.partition(":")[0])
            with self.open(parts) as f:
                while chunk := f.read(_CHUNK):
                    hasher.update(chunk)
        except FileNotFoundError:
            return False
        return f"{digest.partition(':')[0]}:{hasher.hexdigest()}" == digest
