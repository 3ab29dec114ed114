"""The metadata store: one SQLite database per state directory.

Every record is one row holding all the fields BuildKit keeps under its `cache.*` and
`snapshot.*` keys, with indexes on chain id and blob chain id, and per-record external
key/values in a table of their own. A write is one transaction (BuildKit's queue-then-commit
becomes "change the in-memory row, then `save` it"). The database runs in WAL mode with
`synchronous=NORMAL`: a committed transaction survives a crash of the process, which is the
failure the cache must survive (a power loss may lose the last transactions, never corrupt).

Any number of stores, in any processes, may have one state directory open at once: each
holds a shared `flock` on the file `lock` for its life. The exclusive lock is taken only
briefly, for what no other store may see half done (moving a legacy store up, creating or
migrating the schema, moving a damaged database aside), and said to be brief in the lock
file. A store that needs it, or that opens while another holds it, waits up to its
`lock_timeout` (for a brief hold, at least 10 s), logging once who holds it (the exclusive
holder writes its process id and command line into the lock file), then fails with
`LockedError`. A single-process version (metadata schema 1) holds the lock exclusively
while it is open. Writes are short `BEGIN IMMEDIATE` transactions; SQLite's busy timeout
makes a writer wait for another process's transaction.

Each open manager is a session: a file `sessions/<id>` on which it holds an exclusive
`flock` for its life, which the kernel drops when the process dies however it dies. A
session is dead when another process can lock its file; `reap` deletes its file. Every
change of a record row but of its last use is logged in `changes` (by triggers), which the
other processes read to bring the records they keep in memory up to date
(`foreign_changes`); the last uses are read whole when they matter (`usage_times`).

Locks across processes are OFD byte-range locks on one byte each of `records.lock` (at an
offset hashed from a key), which the kernel drops with the process too: `exclusive(key)`
serializes work, and the holds are read locks on a record's byte (`hold`), which a removal
must turn into a write lock to claim the record (`claim_removal`).

Before version 0.2 the command line kept its store in `STATE_DIR/cache`; opening `STATE_DIR`
moves such a store up into it (under both locks), so that scripts and the command line see
the same records. When both places hold a store, opening refuses rather than choose.

The state directory is trusted, so it must be the user's own, as ssh and gpg require of
theirs: one that is a symlink, is owned by another user, or is writable by group or others
is refused with `InvalidError` (one of the user's that others may only read is narrowed to
0700). Its files are opened from the directory's descriptor with `O_NOFOLLOW`, a new one
with `O_EXCL`; a symlink or non-regular file where one of its files should be is refused,
and nothing is chmodded or written through a symlink.

The store's id (the manager id in the ownership label of every lease) is kept twice: in the
database and in the file `manager-id` beside it, written once when the store is created. A
database that was lost or truncated to nothing is created again with the same id, so the
manager still recognizes its leases and can tell that records were lost. A database that
SQLite cannot read, or whose id differs from the file's, raises `StoreDamagedError` naming
the file; `repair=True` moves an unreadable database aside (`metadata.db.damaged-<time>`)
and starts an empty one with the saved id. Every SQLite error is mapped: a full file system
to `NoSpaceError` (the transaction is rolled back), anything else to `StoreDamagedError`.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import pathlib
import re
import sqlite3
import stat
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Final, TypeVar

from .errors import (
    CacheError,
    InvalidError,
    LockedError,
    NoSpaceError,
    NotFoundError,
    StoreDamagedError,
)
from .types import CachePolicy, RecordType

DB_NAME: Final = "metadata.db"
ID_NAME: Final = "manager-id"
LOCK_NAME: Final = "lock"
SESSIONS_DIR: Final = "sessions"
RECORDS_LOCK_NAME: Final = "records.lock"
_CHANGES_KEPT: Final = 10_000
"""How many logged changes are kept; a process further behind reloads all its records."""
_BUSY_TIMEOUT_MS: Final = 30_000
_NEW_SESSION_GRACE: Final = 60.0
_SQLITE_SUFFIXES: Final = ("-wal", "-shm", "-journal")
LEGACY_SUBDIR: Final = "cache"
_LOCK_POLL: Final = 0.1
_EXCLUSIVE_GRACE: Final = 10.0
"""Seconds an open waits, whatever its `lock_timeout`, for another's brief exclusive step."""
_BRIEF: Final = "brief"
"""The lock file's second line while a version that holds it only briefly holds it."""
_STORE_FILES: Final = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", ID_NAME)

log = logging.getLogger(__name__)
_SQLITE_FULL: Final = 13
_SQLITE_BUSY: Final = 5
_F_OFD_GETLK: Final = 36
_F_OFD_SETLK: Final = 37
_F_OFD_SETLKW: Final = 38
_CLAIM_WAIT: Final = 0.5
"""Seconds a hold waits for another process's claim of the record (a transaction)."""
_FLOCK: Final = struct.Struct("hhqqi4x")
_ID_RE: Final = re.compile(r"^[0-9a-f]{32}$")

_COLUMNS: Final = (
    "id",
    "committed",
    "parent",
    "equal_mutable",
    "snapshot_id",
    "size",
    "cache_policy",
    "description",
    "created_at",
    "last_used_at",
    "usage_count",
    "layer_type",
    "record_type",
    "diff_id",
    "chain_id",
    "blob_chain_id",
    "blob",
    "blob_only",
    "media_type",
    "blob_size",
    "image_refs",
    "deleted",
)

# Each entry moves the schema one version up; PRAGMA user_version counts the applied ones.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
        """,
        """
        CREATE TABLE records (
            id TEXT PRIMARY KEY,
            committed INTEGER NOT NULL DEFAULT 0,
            parent TEXT NOT NULL DEFAULT '',
            equal_mutable TEXT NOT NULL DEFAULT '',
            snapshot_id TEXT NOT NULL DEFAULT '',
            size INTEGER,
            cache_policy INTEGER NOT NULL DEFAULT 0,
            description TEXT NOT NULL DEFAULT '',
            created_at INTEGER,
            last_used_at INTEGER,
            usage_count INTEGER NOT NULL DEFAULT 0,
            layer_type TEXT NOT NULL DEFAULT '',
            record_type TEXT NOT NULL DEFAULT '',
            diff_id TEXT NOT NULL DEFAULT '',
            chain_id TEXT NOT NULL DEFAULT '',
            blob_chain_id TEXT NOT NULL DEFAULT '',
            blob TEXT NOT NULL DEFAULT '',
            blob_only INTEGER NOT NULL DEFAULT 0,
            media_type TEXT NOT NULL DEFAULT '',
            blob_size INTEGER,
            image_refs TEXT NOT NULL DEFAULT '[]',
            deleted INTEGER NOT NULL DEFAULT 0
        )
        """,
        """
        CREATE INDEX records_chain_id ON records (chain_id) WHERE chain_id != ''
        """,
        """
        CREATE INDEX records_blob_chain_id ON records (blob_chain_id) WHERE blob_chain_id != ''
        """,
        """
        CREATE TABLE externals (
            record_id TEXT NOT NULL REFERENCES records (id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value BLOB NOT NULL,
            PRIMARY KEY (record_id, key)
        )
        """,
    ),
    # Version 2: several processes share one state directory.
    (
        "CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, record_id TEXT NOT NULL)",
        """
        CREATE TRIGGER records_inserted AFTER INSERT ON records
        BEGIN INSERT INTO changes (record_id) VALUES (NEW.id); END
        """,
        """
        CREATE TRIGGER records_updated AFTER UPDATE OF
            committed, parent, equal_mutable, snapshot_id, size, cache_policy, description,
            created_at, layer_type, record_type, diff_id, chain_id, blob_chain_id, blob,
            blob_only, media_type, blob_size, image_refs, deleted
        ON records
        BEGIN INSERT INTO changes (record_id) VALUES (NEW.id); END
        """,
        """
        CREATE TRIGGER records_deleted AFTER DELETE ON records
        BEGIN INSERT INTO changes (record_id) VALUES (OLD.id); END
        """,
        "CREATE INDEX records_parent ON records (parent) WHERE parent != ''",
        "CREATE INDEX records_equal_mutable ON records (equal_mutable) WHERE equal_mutable != ''",
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


@dataclass
class RecordMeta:
    """One record's row. Times are nanoseconds since the epoch; None means unset. The enums
    are stored as their values (`_to_row`, `_from_row`); a record type stored empty (as an
    unset one was stored before) is REGULAR."""

    id: str
    committed: bool = False
    parent: str = ""
    equal_mutable: str = ""
    snapshot_id: str = ""
    size: int | None = None
    cache_policy: CachePolicy = CachePolicy.DEFAULT
    description: str = ""
    created_at: int | None = None
    last_used_at: int | None = None
    usage_count: int = 0
    layer_type: str = ""
    record_type: RecordType = RecordType.REGULAR
    diff_id: str = ""
    chain_id: str = ""
    blob_chain_id: str = ""
    blob: str = ""
    blob_only: bool = False
    media_type: str = ""
    blob_size: int | None = None
    image_refs: list[str] = field(default_factory=list)
    deleted: bool = False

    def copy(self) -> RecordMeta:
        return dataclasses.replace(self, image_refs=list(self.image_refs))


_IMAGE_REFS, _CACHE_POLICY, _RECORD_TYPE = (
    _COLUMNS.index(name) for name in ("image_refs", "cache_policy", "record_type")
)


def _to_row(meta: RecordMeta) -> tuple[object, ...]:
    # Field by field: `dataclasses.astuple` deep-copies every value, several times slower,
    # and every save comes through here.
    row = [getattr(meta, column) for column in _COLUMNS]
    row[_IMAGE_REFS] = json.dumps(meta.image_refs)
    row[_CACHE_POLICY] = meta.cache_policy.value
    row[_RECORD_TYPE] = meta.record_type.value
    return tuple(row)


def _from_row(row: sqlite3.Row) -> RecordMeta:
    """The row as a `RecordMeta`; `ValueError` for a value no version writes."""
    values = dict(zip(_COLUMNS, row, strict=True))
    values["image_refs"] = json.loads(values["image_refs"])
    values["cache_policy"] = CachePolicy(values["cache_policy"])
    values["record_type"] = RecordType(values["record_type"] or RecordType.REGULAR)
    for flag in ("committed", "blob_only", "deleted"):
        values[flag] = bool(values[flag])
    return RecordMeta(**values)


def _is_full(err: sqlite3.Error) -> bool:
    return err.sqlite_errorcode & 0xFF == _SQLITE_FULL


T = TypeVar("T")


def _retrying(call: Callable[[], T]) -> T:
    """`call()`, tried again while the database is busy (another process writing), in steps
    of 20 µs growing to 2 ms, for up to `_BUSY_TIMEOUT_MS`; then SQLite's busy error."""
    deadline = 0.0
    delay = 0.00002
    while True:
        try:
            return call()
        except sqlite3.OperationalError as err:
            if err.sqlite_errorcode & 0xFF != _SQLITE_BUSY:
                raise
            now = time.monotonic()
            deadline = deadline or now + _BUSY_TIMEOUT_MS / 1000
            if now >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.002)


def _offset(key: str) -> int:
    """The byte of `records.lock` that stands for `key`."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "big")


@functools.lru_cache(maxsize=65536)
def _hold_offset(record_id: str) -> int:
    return _offset(f"hold-{record_id}")


def _lock_file(fd: int, directory: pathlib.Path, timeout: float, *, shared: bool = False) -> None:
    """Takes the lock of `fd`, `directory`'s open lock file (shared or exclusive); waits up
    to `timeout` seconds (at least `_EXCLUSIVE_GRACE` while the holder says its hold is
    brief), logging once who holds it, else raises `LockedError`."""
    start = time.monotonic()
    logged = False
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder, brief = _holder(fd)
            limit = max(timeout, _EXCLUSIVE_GRACE) if brief else max(0.0, timeout)
            if time.monotonic() - start >= limit:
                waited = f" after waiting {timeout:g}s" if timeout > 0 else ""
                raise LockedError(
                    f"state directory {directory} is in use by another open manager "
                    f"({holder}){waited}"
                ) from None
            if not logged and not brief:
                log.warning(
                    "state directory %s is in use (%s); waiting up to %gs for it",
                    directory,
                    holder,
                    timeout,
                )
                logged = True
            time.sleep(_LOCK_POLL)


def _opening(fd: int, kind: int) -> None:
    """Takes (waiting) or gives up the opening lock, a write lock on the first byte of the
    directory's lock file `fd` (an OFD lock, apart from its `flock`): one store at a time
    goes from the shared lock to the schema check, and the exclusive lock when needed.
    Stores opening at once so wait in line holding nothing, rather than each holding the
    shared lock that another's exclusive lock for creating the schema waits for."""
    fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(kind, os.SEEK_SET, 0, 1, 0))


def _write_holder(fd: int, *, brief: bool = False) -> None:
    """Records this process in the lock file it holds, for those who wait for it; `brief`
    says that the hold ends soon (they wait for it whatever their timeout)."""
    try:
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    with suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n{_BRIEF if brief else ''}\n".encode(), 0)


def _holder(fd: int) -> tuple[str, bool]:
    """Who holds the lock, as its exclusive holder wrote it, and whether it holds it only
    briefly."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        text = ""
    first, _, rest = text.partition("\n")
    brief = rest.strip() == _BRIEF
    pid, _, command = first.strip().partition(" ")
    if not pid.isdigit():
        return "shared by open managers", brief
    command = "".join(c if c.isprintable() else "?" for c in command)[:200]
    return (f"pid {pid}: {command}" if command else f"pid {pid}"), brief


class MetadataStore:
    """The records of one state directory; thread-safe. Any number of stores, in any
    processes, may have one directory open at once.

    `repair` moves an unreadable database aside and starts an empty one with the saved id.
    """

    def __init__(
        self, state_dir: str | os.PathLike[str], *, repair: bool = False, lock_timeout: float = 0.0
    ) -> None:
        self.state_dir = pathlib.Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.id_path = self.state_dir / ID_NAME
        self._mu = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._dir_fd = -1
        self._records_lock_fd = -1
        self._sessions_fd = -1
        self._session_fd = -1
        self._session = ""
        self._data_version = 0
        self._seq = 0
        # The rows as this process last wrote or took them (`track`): an update writes only
        # the columns that differ, so that it never undoes another process's change of the
        # others (a finalize, a blob, a size).
        self._known: dict[str, tuple[object, ...]] = {}
        self._lock_timeout = lock_timeout
        self._lock_fd = self._lock_directory(self._lock_timeout)
        try:
            self._records_lock_fd = self._open_file(RECORDS_LOCK_NAME, os.O_RDWR | os.O_CREAT)
            try:
                self.manager_id = self._open(repair)
            finally:
                _opening(self._lock_fd, fcntl.F_UNLCK)
            with self._mu, self._mapped():
                db = self._connection()
                (self._data_version,) = _retrying(
                    lambda: db.execute("PRAGMA data_version").fetchone()
                )
                (seq,) = _retrying(
                    lambda: db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()
                )
                self._seq = int(seq)
        except BaseException:
            self._close_db()
            self._release_lock()
            raise

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _open(self, repair: bool) -> str:
        """Opens the database under the shared lock when its schema is current, else takes
        the exclusive lock to move a legacy store up, create or migrate the schema, or move
        a damaged database aside (with `repair`)."""
        if not self._legacy_present():
            try:
                with self._mapped():
                    self._db = self._connect()
                    manager_id = self._current_id(self._read_id())
                if manager_id is not None:
                    return manager_id
            except StoreDamagedError as err:
                if not repair or err.path != str(self.path):
                    raise
            self._close_db()
        with self._exclusively():
            self._adopt_legacy_store()
            saved_id = self._read_id()
            try:
                with self._mapped():
                    self._db = self._connect()
                    return self._migrate(saved_id)
            except StoreDamagedError as err:
                if not repair or err.path != str(self.path):
                    raise
            self._close_db()
            self._move_aside()
            with self._mapped():
                self._db = self._connect()
                return self._migrate(saved_id)

    @contextmanager
    def _exclusively(self) -> Iterator[None]:
        """Holds the directory's lock exclusively (no other store is open meanwhile), then
        goes back to the shared lock. The shared lock is given up first: two stores that
        both upgraded would wait for each other."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        try:
            _lock_file(self._lock_fd, self.state_dir, self._lock_timeout)
        except LockedError:
            # Back to where the caller was, so that its clean-up finds the lock it had.
            _lock_file(self._lock_fd, self.state_dir, self._lock_timeout, shared=True)
            raise
        _write_holder(self._lock_fd, brief=True)
        try:
            yield
        finally:
            with suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def _current_id(self, saved_id: str | None) -> str | None:
        """The store's id when the schema is current and the id file agrees; None when the
        exclusive lock is needed to create or migrate it (or to write the id file)."""
        assert self._db is not None
        db = self._db
        (version,) = _retrying(lambda: db.execute("PRAGMA user_version").fetchone())
        self._check_version(version)
        if version != SCHEMA_VERSION or saved_id is None:
            return None
        row = _retrying(
            lambda: db.execute("SELECT value FROM meta WHERE key = 'manager_id'").fetchone()
        )
        if row is None:
            return None
        self._check_id(str(row[0]), saved_id)
        return str(row[0])

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise InvalidError(
                f"metadata store {self.path} has schema version {version}, newer than this "
                f"version of pyctrd-cache understands ({SCHEMA_VERSION})"
            )

    def _check_id(self, manager_id: str, saved_id: str | None) -> None:
        if saved_id is not None and saved_id != manager_id:
            raise StoreDamagedError(
                f"the metadata store {self.path} belongs to manager {manager_id}, but the "
                f"id file {self.id_path} says {saved_id}: one of them comes from another "
                "state directory; put the right one back",
                path=str(self.id_path),
            )

    def _damaged(self, problem: str) -> StoreDamagedError:
        return StoreDamagedError(
            f"the metadata store {self.path} is damaged ({problem}); "
            "Manager.open(..., repair=True) moves it aside and starts an empty one, giving up "
            "the records it held (containerd then collects their data)",
            path=str(self.path),
        )

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """Maps SQLite's errors to the project's: a full disk, or a damaged store."""
        try:
            yield
        except sqlite3.Error as err:
            if err.sqlite_errorcode & 0xFF == _SQLITE_BUSY:
                raise LockedError(
                    f"the metadata store {self.path} stayed busy (another process writing) "
                    f"for {_BUSY_TIMEOUT_MS // 1000}s: {err}"
                ) from None
            if _is_full(err):
                raise NoSpaceError(
                    f"no space left to write the metadata store {self.path}: {err}"
                ) from None
            raise self._damaged(str(err)) from None

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for suffix in ("", "-wal", "-shm"):
            with suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{self.path}.damaged-{stamp}{suffix}")

    def _open_file(self, name: str, flags: int) -> int:
        """`name` in the state directory, opened without following a symlink; a symlink or
        a non-regular file is refused."""
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._dir_fd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise self._unsafe(f"{self.state_dir / name} is a symlink") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise self._unsafe(f"{self.state_dir / name} is not a file of the current user")
        return fd

    def _unsafe(self, problem: str) -> InvalidError:
        return InvalidError(
            f"refusing the state directory {self.state_dir}: {problem}; it must be a directory "
            "of the current user that no one else can write, holding no symlinks"
        )

    def _read_id(self) -> str | None:
        try:
            fd = self._open_file(ID_NAME, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                text = f.read(256).decode().strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise StoreDamagedError(
                f"cannot read the manager id file {self.id_path}: {err}", path=str(self.id_path)
            ) from None
        if not _ID_RE.match(text):
            raise StoreDamagedError(
                f"the manager id file {self.id_path} does not hold a manager id; if the "
                f"metadata store {self.path} is intact, delete the file and it is written again",
                path=str(self.id_path),
            )
        return text

    def _write_id(self, manager_id: str) -> None:
        """Writes the id file atomically (a new file renamed over it)."""
        tmp = ID_NAME + ".tmp"
        dir_fd = self._dir_fd
        try:
            # A file left by a crash (or planted) is removed, not written through.
            with suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            fd = self._open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                os.write(fd, (manager_id + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, ID_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as err:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            cls = NoSpaceError if err.errno == errno.ENOSPC else CacheError
            raise cls(f"cannot write the manager id file {self.id_path}: {err.strerror}") from None

    def _open_directory(self) -> None:
        """Makes the state directory (mode 0700) unless it exists, and opens it, refusing
        one that is not safe."""
        self.state_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with suppress(FileExistsError):
            os.mkdir(self.state_dir, 0o700)
        try:
            self._dir_fd = os.open(
                self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._unsafe("it is a symlink or not a directory") from None
            raise
        st = os.fstat(self._dir_fd)
        if st.st_uid != os.geteuid():
            raise self._unsafe(f"it is owned by uid {st.st_uid}, not {os.geteuid()}")
        if st.st_mode & 0o022:
            raise self._unsafe(f"its mode {stat.S_IMODE(st.st_mode):04o} lets others write")
        os.fchmod(self._dir_fd, 0o700)

    def _lock_directory(self, timeout: float) -> int:
        """The directory's lock file, locked shared."""
        try:
            self._open_directory()
            fd = self._open_file(LOCK_NAME, os.O_RDWR | os.O_CREAT)
        except InvalidError:
            self._close_directory()
            raise
        except OSError as err:
            self._close_directory()
            raise CacheError(
                f"cannot use state directory {self.state_dir}: {err.strerror}"
            ) from None
        try:
            _opening(fd, fcntl.F_WRLCK)
            _lock_file(fd, self.state_dir, timeout, shared=True)
        except BaseException:
            os.close(fd)
            self._close_directory()
            raise
        return fd

    def _close_directory(self) -> None:
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def _legacy_present(self) -> bool:
        legacy = self.state_dir / LEGACY_SUBDIR
        return (legacy / DB_NAME).is_file() and not legacy.is_symlink()

    def _adopt_legacy_store(self) -> None:
        """Moves a store the command line kept in `STATE_DIR/cache` up into the state
        directory, unless the state directory has one of its own (then refuses). Caller
        holds the directory's lock exclusively."""
        legacy = self.state_dir / LEGACY_SUBDIR
        if not self._legacy_present():
            return
        if self.path.exists():
            raise InvalidError(
                f"two metadata stores: {self.path} and {legacy / DB_NAME} (where versions "
                f"before 0.2 of the command line kept theirs); move one of them elsewhere"
            )
        try:
            fd = os.open(
                legacy / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise self._unsafe(f"{legacy / LOCK_NAME} is a symlink") from None
            raise CacheError(f"cannot use state directory {legacy}: {err.strerror}") from None
        try:
            _lock_file(fd, legacy, self._lock_timeout)
        except BaseException:
            os.close(fd)
            raise
        legacy_fd = fd
        try:
            for name in _STORE_FILES:
                with suppress(FileNotFoundError):
                    os.rename(legacy / name, self.state_dir / name)
            # What a store of this version leaves in a directory besides its database.
            with suppress(OSError):
                os.unlink(legacy / RECORDS_LOCK_NAME)
            with suppress(OSError):
                (legacy / SESSIONS_DIR).rmdir()
            with suppress(OSError):
                os.unlink(legacy / LOCK_NAME)
                legacy.rmdir()
        except OSError as err:
            raise CacheError(
                f"cannot move the metadata store {legacy / DB_NAME} to {self.path}: {err.strerror}"
            ) from None
        finally:
            os.close(legacy_fd)
        log.warning("moved the metadata store %s up to %s", legacy / DB_NAME, self.path)

    def _release_lock(self) -> None:
        for fd in (self._records_lock_fd, self._session_fd, self._sessions_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._records_lock_fd = self._session_fd = self._sessions_fd = self._lock_fd = -1
        self._close_directory()

    def _connect(self) -> sqlite3.Connection:
        # The file exists with mode 0600 before SQLite opens it, whatever the umask; SQLite
        # gives its -wal and -shm files the database file's mode. SQLite opens them by name:
        # the directory is the user's own and no one else's to change meanwhile, and a
        # symlink there (planted before, or moved up with an old store) is refused.
        for suffix in _SQLITE_SUFFIXES:
            with suppress(FileNotFoundError):
                mode = os.stat(DB_NAME + suffix, dir_fd=self._dir_fd, follow_symlinks=False)
                if not stat.S_ISREG(mode.st_mode):
                    raise self._unsafe(f"{self.state_dir / (DB_NAME + suffix)} is not a file")
        fd = self._open_file(DB_NAME, os.O_RDWR | os.O_CREAT)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise self._damaged("; ".join(problems))
            # From here a busy database is waited for by `_retrying`, in steps far shorter
            # than SQLite's own (1 ms and up), which would stall several processes writing.
            db.execute("PRAGMA busy_timeout=0")
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self, saved_id: str | None) -> str:
        """Brings the schema up to date; the store's id (the saved one for a new database).
        Caller holds the directory's lock exclusively."""
        assert self._db is not None
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        self._check_version(version)
        with self._transaction() as db:
            for number in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[number]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number + 1}")
            row = db.execute("SELECT value FROM meta WHERE key = 'manager_id'").fetchone()
            if row is None:
                manager_id = saved_id or uuid.uuid4().hex
                db.execute("INSERT INTO meta (key, value) VALUES ('manager_id', ?)", (manager_id,))
            else:
                manager_id = str(row[0])
            self._check_id(manager_id, saved_id)
        if version and version < SCHEMA_VERSION:
            log.info("migrated the metadata store %s to schema version %d", self.path, version)
        if saved_id is None:
            self._write_id(manager_id)
        return manager_id

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; on any error it is rolled back and SQLite's error mapped."""
        with self._mu, self._mapped():
            db = self._connection()
            _retrying(lambda: db.execute("BEGIN IMMEDIATE"))
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk does that).
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._mu, self._mapped():
            db = self._connection()
            return _retrying(lambda: db.execute(sql, args).fetchall())

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise InvalidError(f"the metadata store {self.path} is closed")
        return self._db

    def _record(self, row: sqlite3.Row) -> RecordMeta:
        """The row as a `RecordMeta`; `StoreDamagedError` for a value no version writes."""
        try:
            return _from_row(row)
        except ValueError as err:
            raise self._damaged(f"record {row[0]}: {err}") from None

    def all(self) -> list[RecordMeta]:
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM records")
        return [self._record(r) for r in rows]

    def get(self, record_id: str) -> RecordMeta | None:
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM records WHERE id = ?", (record_id,))
        return self._record(rows[0]) if rows else None

    def search_chain(self, chain_id: str) -> list[str]:
        """Ids of live records with this chain id."""
        rows = self._query(
            "SELECT id FROM records WHERE chain_id = ? AND NOT deleted ORDER BY rowid", (chain_id,)
        )
        return [r[0] for r in rows]

    def search_blob_chain(self, blob_chain_id: str) -> list[str]:
        """Ids of live records with this blob chain id."""
        rows = self._query(
            "SELECT id FROM records WHERE blob_chain_id = ? AND NOT deleted ORDER BY rowid",
            (blob_chain_id,),
        )
        return [r[0] for r in rows]

    def track(self, meta: RecordMeta) -> None:
        """Takes `meta` as the row this process knows (read from the store, or brought up
        to date with it): later updates of it write only the columns changed since."""
        row = _to_row(meta)
        with self._mu:
            self._known[meta.id] = row

    def insert(self, meta: RecordMeta) -> None:
        """Writes a new row."""
        placeholders = ", ".join("?" for _ in _COLUMNS)
        row = _to_row(meta)
        with self._transaction() as db:
            db.execute(f"INSERT INTO records ({', '.join(_COLUMNS)}) VALUES ({placeholders})", row)
            self._known[meta.id] = row

    def update(
        self,
        *metas: RecordMeta,
        delete: Iterable[str] = (),
    ) -> None:
        """Rewrites existing rows (the columns changed since this store knew them) and drops
        the rows `delete`, in one transaction.

        A row that no longer exists is not brought back.
        """
        deleted = [(i,) for i in delete]
        rows = [_to_row(m) for m in metas]
        with self._transaction() as db:
            for row in rows:
                known = self._known.get(str(row[0]))
                changed = [
                    i for i in range(1, len(_COLUMNS)) if known is None or row[i] != known[i]
                ]
                if changed:
                    assignments = ", ".join(f"{_COLUMNS[i]} = ?" for i in changed)
                    db.execute(
                        f"UPDATE records SET {assignments} WHERE id = ?",
                        (*(row[i] for i in changed), row[0]),
                    )
            db.executemany("DELETE FROM records WHERE id = ?", deleted)
            for row in rows:
                if str(row[0]) in self._known:
                    self._known[str(row[0])] = row
            for (record_id,) in deleted:
                self._known.pop(record_id, None)

    def reload(self, meta: RecordMeta) -> None:
        """Puts the stored row back into `meta` in place (after a write that failed)."""
        stored = self.get(meta.id)
        if stored is not None:
            for f in dataclasses.fields(stored):
                setattr(meta, f.name, getattr(stored, f.name))
            if meta.id in self._known:
                self.track(meta)

    def delete(self, *record_ids: str) -> None:
        """Drops the rows and their external values."""
        self.update(delete=record_ids)

    def get_external(self, record_id: str, key: str) -> bytes | None:
        rows = self._query(
            "SELECT value FROM externals WHERE record_id = ? AND key = ?", (record_id, key)
        )
        return bytes(rows[0][0]) if rows else None

    def set_external(self, record_id: str, key: str, value: bytes) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO externals (record_id, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (record_id, key) DO UPDATE SET value = excluded.value",
                (record_id, key, value),
            )

    # Sessions: one per open manager, alive while its process holds the lock on its file.

    def open_session(self, session: str) -> None:
        """Makes this store's session file and holds its lock until `close`. The file is
        locked before it gets its name, so that no one finds it unlocked."""
        try:
            with suppress(FileExistsError):
                os.mkdir(SESSIONS_DIR, 0o700, dir_fd=self._dir_fd)
            self._sessions_fd = os.open(
                SESSIONS_DIR,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self._dir_fd,
            )
            tmp = f".{session}.new"
            fd = os.open(
                tmp,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self._sessions_fd,
            )
            self._session_fd = fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_holder(fd)
            os.rename(tmp, session, src_dir_fd=self._sessions_fd, dst_dir_fd=self._sessions_fd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise self._unsafe(f"{self.state_dir / SESSIONS_DIR} is a symlink") from None
            cls = NoSpaceError if err.errno == errno.ENOSPC else CacheError
            raise cls(f"cannot make a session file in {self.state_dir}: {err.strerror}") from None
        self._session = session

    def session_alive(self, session: str) -> bool:
        """Whether the session's process holds its file's lock; a session without a file is
        dead (or was reaped)."""
        if session == self._session:
            return True
        if self._sessions_fd < 0:
            raise InvalidError(f"the metadata store {self.path} is closed")
        try:
            fd = os.open(
                session,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=self._sessions_fd,
            )
        except FileNotFoundError:
            return False
        except OSError:
            return True  # not ours to judge: counted alive, never reaped
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def session_names(self) -> list[str]:
        """The names in the sessions directory (live sessions, and dead ones not reaped)."""
        try:
            return [n for n in os.listdir(self._sessions_fd) if not n.startswith(".")]
        except OSError:
            return []

    def dead_sessions(self) -> set[str]:
        """Sessions that left a file behind and whose process is gone."""
        try:
            names = set(os.listdir(self._sessions_fd))
        except OSError:
            names = set()
        dead = set()
        for name in names - {self._session}:
            if name.startswith(".") and not self._stale_new_session(name):
                continue
            if not self.session_alive(name):
                dead.add(name)
        return dead

    def _stale_new_session(self, name: str) -> bool:
        """Whether `name` is a session file left half made long ago: one being made is
        unlocked for a moment, and must not be taken for a dead one."""
        try:
            st = os.stat(name, dir_fd=self._sessions_fd, follow_symlinks=False)
        except OSError:
            return False
        return time.time() - st.st_mtime > _NEW_SESSION_GRACE

    def reap(self, sessions: Iterable[str]) -> None:
        """Deletes the files of dead sessions, and trims the change log."""
        with self._transaction() as db:
            db.execute(
                "DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - ?",
                (_CHANGES_KEPT,),
            )
        for name in sessions:
            with suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._sessions_fd)

    # Holds: a read lock on the record's byte while this process has handles on it.

    def hold(self, record_id: str, *, exclusive: Iterable[str] | None = None) -> bool:
        """Holds the record for this process (a read lock on its byte): `NotFoundError`
        when its row is gone or marked deleted. With `exclusive`, the hold is a write lock,
        and `LockedError` when another process holds the record or one of `exclusive`. A
        hold waits briefly for a removal's claim to end, and an exclusive holder is
        `LockedError`. Whether another process wrote since `foreign_changes` last looked:
        when none did, the row is as the caller knows it and is not read."""
        byte = _hold_offset(record_id)
        if exclusive is None:
            self._lock_byte(byte, fcntl.F_RDLCK, wait=_CLAIM_WAIT, record_id=record_id)
        else:
            self._lock_byte(byte, fcntl.F_WRLCK, wait=0.0, record_id=record_id)
            if self.held_elsewhere(exclusive):
                self._unlock_byte(byte)
                raise LockedError(f"record {record_id} is locked by another process")
        try:
            with self._mu, self._mapped():
                db = self._connection()
                (version,) = _retrying(lambda: db.execute("PRAGMA data_version").fetchone())
                if version == self._data_version:
                    return False
                row = _retrying(
                    lambda: db.execute(
                        "SELECT deleted FROM records WHERE id = ?", (record_id,)
                    ).fetchone()
                )
        except BaseException:
            self._unlock_byte(byte)
            raise
        if row is None or row[0]:
            self._unlock_byte(byte)
            raise NotFoundError(f"record {record_id} was removed")
        return True

    def hold_new(self, record_id: str) -> None:
        """Holds a record whose row this process has just written."""
        self._lock_byte(_hold_offset(record_id), fcntl.F_RDLCK, wait=0.0, record_id=record_id)

    def unhold(self, record_id: str) -> None:
        """Drops this process's hold on the record."""
        self._unlock_byte(_hold_offset(record_id))

    def check_unheld(self, record_ids: Iterable[str]) -> None:
        """`LockedError` when another process holds one of the records."""
        for record_id in self.held_elsewhere(record_ids):
            raise LockedError(f"record {record_id} is locked by another process")

    def held_elsewhere(self, record_ids: Iterable[str]) -> list[str]:
        """The records among `record_ids` that another process holds (one `F_OFD_GETLK`
        each)."""
        fd = self._lock_fd_for_records()
        held = []
        for record_id in record_ids:
            probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _hold_offset(record_id), 1, 0)
            if _FLOCK.unpack(fcntl.fcntl(fd, _F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK:
                held.append(record_id)
        return held

    def claim_removal(self, record_ids: Iterable[str]) -> bool:
        """Marks the rows deleted unless another process holds one of them (write locks on
        their bytes, taken without waiting) or a live row outside them is built on one (its
        parent, or its equal mutable); whether it did. The write locks order a removal with
        another process's `hold`: the hold waits for the claim, then finds the row deleted."""
        ids = sorted(set(record_ids))
        taken: list[int] = []
        try:
            for record_id in ids:
                byte = _hold_offset(record_id)
                try:
                    self._lock_byte(byte, fcntl.F_WRLCK, wait=0.0, record_id=record_id)
                except LockedError:
                    return False
                taken.append(byte)
            marks = ", ".join("?" for _ in ids)
            with self._transaction() as db:
                built_on = db.execute(
                    f"SELECT 1 FROM records WHERE NOT deleted AND id NOT IN ({marks}) "
                    f"AND (parent IN ({marks}) OR equal_mutable IN ({marks})) LIMIT 1",
                    (*ids, *ids, *ids),
                ).fetchone()
                if built_on is not None:
                    return False
                db.execute(f"UPDATE records SET deleted = 1 WHERE id IN ({marks})", ids)
                for record_id in ids:
                    known = self._known.get(record_id)
                    if known is not None:
                        self._known[record_id] = (*known[:-1], True)
            return True
        finally:
            for byte in taken:
                self._unlock_byte(byte)

    def _lock_fd_for_records(self) -> int:
        if self._records_lock_fd < 0:
            raise InvalidError(f"the metadata store {self.path} is closed")
        return self._records_lock_fd

    def _lock_byte(self, offset: int, kind: int, *, wait: float, record_id: str) -> None:
        """Takes a lock on one byte of `records.lock` without blocking, trying again for
        up to `wait` seconds; `LockedError` when another process keeps a conflicting one."""
        fd = self._lock_fd_for_records()
        request = _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.fcntl(fd, _F_OFD_SETLK, request)
                return
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise CacheError(f"cannot lock {RECORDS_LOCK_NAME}: {err.strerror}") from None
            if time.monotonic() >= deadline:
                raise LockedError(f"record {record_id} is locked by another process")
            time.sleep(0.001)

    def _unlock_byte(self, offset: int) -> None:
        fd = self._records_lock_fd
        if fd >= 0:
            fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))

    def twins_of(self, mutable_id: str) -> list[str]:
        """Live immutable records whose equal mutable is `mutable_id` (a lazy commit)."""
        rows = self._query(
            "SELECT id FROM records WHERE equal_mutable = ? AND NOT deleted ORDER BY rowid",
            (mutable_id,),
        )
        return [str(r[0]) for r in rows]

    def usage_times(self) -> dict[str, tuple[int | None, int]]:
        """Each row's last use and use count, which the change log leaves out (a hot
        release writes them)."""
        rows = self._query("SELECT id, last_used_at, usage_count FROM records")
        return {str(r[0]): (r[1], int(r[2])) for r in rows}

    def live_ids(self) -> list[str]:
        """Ids of the rows not marked deleted, oldest first."""
        return [str(r[0]) for r in self._query("SELECT id FROM records WHERE NOT deleted")]

    def foreign_changes(self, known: Iterable[str]) -> set[str] | None:
        """The records whose rows changed since the last call, when another connection
        committed meanwhile (else None, at the cost of one pragma); all of `known` when
        more changed than the log keeps."""
        with self._mu, self._mapped():
            db = self._connection()
            (version,) = _retrying(lambda: db.execute("PRAGMA data_version").fetchone())
            if version == self._data_version:
                return None
            self._data_version = version
            (first,) = _retrying(lambda: db.execute("SELECT min(seq) FROM changes").fetchone())
            rows = _retrying(
                lambda: db.execute(
                    "SELECT seq, record_id FROM changes WHERE seq > ? ORDER BY seq", (self._seq,)
                ).fetchall()
            )
        changed = {str(r[1]) for r in rows}
        if first is not None and first > self._seq + 1:
            changed.update(known)
        if rows:
            self._seq = int(rows[-1][0])
        return changed

    @contextmanager
    def exclusive(self, key: str) -> Iterator[None]:
        """A lock on `key` across processes (an OFD byte-range lock on `records.lock`,
        dropped by the kernel with the process), waiting for it. Threads of one store share
        its file description, so they must exclude each other on `key` themselves."""
        offset = _offset(key)
        fd = self._lock_fd_for_records()
        fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
        try:
            yield
        finally:
            fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))

    def size_on_disk(self) -> int:
        """Bytes the database and its write-ahead log take."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with suppress(FileNotFoundError):
                total += os.stat(str(self.path) + suffix).st_size
        return total

    def close(self) -> None:
        """Drops this store's session file and closes the database (which ends every lock
        of this store)."""
        if self._session:
            with suppress(CacheError):
                self.reap([self._session])
        with self._mu:
            self._close_db()
        self._release_lock()
