"""A record's layer written from its overlayfs upper directory (BuildKit's
`computeOverlayBlob` and `util/overlay`), so that its cost follows the change, not the size
of the tree below it.

containerd's diff service compares the lower and upper trees entry by entry. With the
overlayfs snapshotter the snapshot's own directory already is the change: what was added or
modified is there, a deleted entry is a whiteout (a character device 0/0), a directory that
replaced the lower one is marked opaque (`trusted.overlay.opaque` or `user.overlay.opaque`
is `y`). The layer is written from a walk of that directory alone, each entry checked
against the parent's tree (a read-only mount of it) only where the diff service's answer
depends on it, and with the diff service's rules, so that applying either layer gives the
same tree:

- an entry the lower tree has, unchanged by continuity's comparison (type and mode, owner,
  device number and `security.capability`; for a non-directory also size and mtime, and
  content or link target when both mtimes are whole seconds), is left out; directories are
  walked on;
- a whiteout becomes a `.wh.NAME` entry, unless the lower tree has no such entry;
- an opaque directory the lower tree has is written with a `.wh..wh..opq` entry, then all
  of its contents (whiteouts below it hide nothing and are left out);
- every directory above a written entry is written first (containerd's `includeParents`);
- entries of the upper directory that are hard links of each other stay linked: the first
  is written whole, the others as links to it; one is written even when unchanged;
- headers are PAX, with mtimes in whole seconds, no user or group names, and of the
  extended attributes only `security.capability` (what the diff service writes); sockets
  are left out.

A snapshot without a parent is a plain directory, its layer all of it; the diff service
walks it alone, so it is written here only when the diff service cannot write the
compression (`bottom_dir`). Otherwise the route is taken only when it can be trusted
(`upper_dir`): the snapshot has a parent,
its mounts are one overlay whose lower directories are exactly the parent's, with no option
but the ones containerd's snapshotter sets and no inode index, the directory is readable
here, and the inode count of the walk is containerd's own usage of the snapshot (so that a
daemon on another host, whose paths name other directories here, is not believed). An
entry with a `redirect` or `metacopy` attribute, which a tar cannot represent from the upper
directory alone, or an error reading it, abandons the route: the caller falls back to the
diff service.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import pathlib
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, BinaryIO, Final

from .._streams import ChunkWriter
from .._tasks import produced
from ..client import Client, Descriptor, Mount, Usage
from ..compression import Compression
from ..errors import NotFoundError
from ..mountpoints import new_mount_point, unmount

if TYPE_CHECKING:
    from ._core import Core

log = logging.getLogger("pyctrd_cache.blobs")

_OPAQUE: Final = ("trusted.overlay.opaque", "user.overlay.opaque")
_UNREPRESENTABLE: Final = (
    "trusted.overlay.redirect",
    "user.overlay.redirect",
    "trusted.overlay.metacopy",
    "user.overlay.metacopy",
)
_CAPABILITY: Final = "security.capability"
_WHITEOUT: Final = ".wh."
_OPAQUE_WHITEOUT: Final = ".wh..wh..opq"
_LOCATION_OPTIONS: Final = ("lowerdir=", "upperdir=", "workdir=")
_HARMLESS_OPTIONS: Final = frozenset({"index=off", "userxattr", "ro", "rw"})
_INDEX_PARAMETER: Final = pathlib.Path("/sys/module/overlay/parameters/index")
_CHUNK: Final = 1 << 20
_ROUTE_BYTES_PER_INODE: Final = 4096
_ROUTE_PROBES: Final = 4


class _Unrepresentable(Exception):
    """The upper directory holds what the route cannot write; the diff service must (never
    raised out of this module)."""


def overlay_layers(m: Mount) -> list[str] | None:
    """The layer directories of an overlay mount, bottom first (its upper directory last);
    None when an option could change what the directories mean."""
    upper: list[str] = []
    lowers: list[str] = []
    for option in m.options:
        if option.startswith("lowerdir="):
            lowers = option.removeprefix("lowerdir=").split(":")[::-1]
        elif option.startswith("upperdir="):
            upper = [option.removeprefix("upperdir=")]
        elif option.startswith("workdir=") or option in _HARMLESS_OPTIONS:
            continue
        else:
            return None
    if "index=off" not in m.options and _index_default_on():
        return None
    return lowers + upper


def _index_default_on() -> bool:
    try:
        return _INDEX_PARAMETER.read_text().strip() in ("Y", "on")
    except OSError:
        return False


def parent_mount(upper: Sequence[Mount]) -> list[Mount]:
    """The read-only mount of the parent of the snapshot whose mounts are `upper` (a view
    of a snapshot lists its own directory, then its parents'), as containerd would give
    for a view of it; none when `upper` is not one overlay."""
    if len(upper) != 1 or upper[0].type != "overlay":
        return []
    layers = overlay_layers(upper[0]) or []
    if len(layers) < 2:
        return []
    if len(layers) == 2:
        return [Mount("bind", layers[0], ("ro", "rbind"))]
    return [Mount("overlay", "overlay", ("lowerdir=" + ":".join(layers[-2::-1]),))]


def upper_dir(lower: Sequence[Mount], upper: Sequence[Mount]) -> tuple[str, str]:
    """The directory holding the change between the two snapshots' mounts, and "" ; or ""
    and why there is none (the caller then uses the diff service)."""
    if not lower:
        return "", "no parent, or not one overlay: the diff service walks only the layer"
    if len(lower) != 1 or len(upper) != 1:
        return "", "more than one mount"
    if lower[0].type == "bind":
        lowers: list[str] | None = [lower[0].source]
    elif lower[0].type == "overlay":
        lowers = overlay_layers(lower[0])
    else:
        return "", f"a lower mount of type {lower[0].type}"
    if upper[0].type != "overlay":
        return "", f"an upper mount of type {upper[0].type}"
    uppers = overlay_layers(upper[0])
    if lowers is None or uppers is None:
        return "", "overlay options the route does not know"
    if uppers[:-1] != lowers:
        return "", "the upper mount's lower directories are not the parent's"
    directory = uppers[-1]
    if not all(os.path.isdir(d) for d in uppers) or not os.access(directory, os.R_OK | os.X_OK):
        return "", f"{directory} is not a readable directory here"
    return directory, ""


def bottom_dir(upper: Sequence[Mount]) -> tuple[str, str]:
    """The directory of a snapshot without a parent (a view of it is a bind mount), and "";
    or "" and why there is none. Its layer is all of it: the diff service walks it alone,
    so it is written here only when the diff service cannot write the compression."""
    if len(upper) != 1 or upper[0].type != "bind":
        return "", "a snapshot without a parent that is not one bind mount"
    directory = upper[0].source
    if not os.path.isdir(directory) or not os.access(directory, os.R_OK | os.X_OK):
        return "", f"{directory} is not a readable directory here"
    return directory, ""


def try_write(
    core: Core,
    leased: Client,
    usage_of: Callable[[str], Usage],
    upper: Sequence[Mount],
    keys: tuple[Sequence[str], str],
    compression: Compression,
    ingest: str,
    write: Callable[[Client, str, Iterator[bytes], Compression], Descriptor],
    *,
    always: bool,
) -> Descriptor | None:
    """The layer of the snapshot whose mounts are `upper`, written from its upper directory
    with `write` (`blobs.write_layer`); None, with nothing written, when the route cannot be
    taken. `keys` are the parent chain's snapshots and the snapshot; `usage_of` asks
    containerd for a snapshot's usage (`blobs.Views.usage`, shared by a chain's layers).

    Unless `always`, the route is taken only when it is the cheaper one: the diff service
    writes a layer's bytes within the daemon, several times faster than they stream here, but
    compares every entry of the tree below, so the route is taken when the upper directory
    holds fewer than `_ROUTE_BYTES_PER_INODE` bytes per inode of the snapshots below it
    (`_cheaper`).
    """
    parents, key = keys
    lower = parent_mount(upper)
    directory, why = upper_dir(lower, upper)
    if not parents and always:
        directory, why = bottom_dir(upper)
    if not directory:
        log.debug("blob of snapshot %s by the diff service: %s", key, why)
        return None
    try:
        usage = usage_of(key)
        if not always and not _cheaper(usage_of, parents, usage.size):
            log.debug(
                "blob of snapshot %s by the diff service: %d bytes of change on few entries",
                key,
                usage.size,
            )
            return None
    except NotFoundError as err:
        log.debug("blob of snapshot %s by the diff service: %s", key, err)
        return None
    try:
        with _mounted(core, lower if parents else []) as base:
            walk = _Walk(directory, base)

            def run(put: Callable[[bytes], None]) -> None:
                sink = io.BufferedWriter(ChunkWriter(put), _CHUNK)
                walk.write(sink)
                sink.flush()
                if walk.inodes != usage.inodes:
                    raise _Unrepresentable(
                        f"{directory} holds {walk.inodes} inodes, containerd counts "
                        f"{usage.inodes}: not the snapshot's directory"
                    )

            desc = write(leased, ingest, produced(run), compression)
    except (_Unrepresentable, OSError, tarfile.TarError) as err:
        log.debug("blob of snapshot %s by the diff service: %s", key, err)
        return None
    log.debug("blob of snapshot %s written from its upper directory %s", key, directory)
    return desc


def _cheaper(usage_of: Callable[[str], Usage], parents: Sequence[str], size: int) -> bool:
    """Whether `size` bytes of change are under `_ROUTE_BYTES_PER_INODE` per inode of the
    snapshots below, counted bottom first (where a tree's bulk usually is) until they are,
    over `_ROUTE_PROBES` snapshots at most so that a long chain of large layers pays few
    calls for its answer."""
    below = 0
    for parent in parents[:_ROUTE_PROBES]:
        below += usage_of(parent).inodes
        if size < below * _ROUTE_BYTES_PER_INODE:
            return True
    return False


@contextlib.contextmanager
def _mounted(core: Core, mounts: Sequence[Mount]) -> Iterator[str | None]:
    """The lower tree, read-only: a bound directory as it is, an overlay mounted here; None
    when there is none."""
    if not mounts:
        yield None
        return
    m = mounts[0]
    if m.type == "bind":
        yield m.source
        return
    target = new_mount_point(core.mounts_dir)
    try:
        options = ",".join(o for o in m.options if o)
        result = subprocess.run(
            ["mount", "-t", m.type, "-o", options, m.source, str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise _Unrepresentable(f"cannot mount the lower tree: {result.stderr.strip()}")
        try:
            yield str(target)
        finally:
            unmount(target)
    finally:
        with contextlib.suppress(OSError):
            target.rmdir()


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def _xattrs(path: str) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise


def _getxattr(path: str, name: str) -> bytes:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return b""
        raise


def _whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _open(path: str) -> BinaryIO:
    """A regular file, opened without following a symlink swapped in meanwhile."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def _same_content(a: str, b: str) -> bool:
    with _open(a) as fa, _open(b) as fb:
        while True:
            x, y = fa.read(_CHUNK), fb.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True


def _same(base_st: os.stat_result, st: os.stat_result, base: str, path: str) -> bool:
    """continuity's comparison of an entry with the lower tree's (`sameFile`)."""
    if (base_st.st_mode, base_st.st_uid, base_st.st_gid, base_st.st_rdev) != (
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_rdev,
    ):
        return False
    if _getxattr(base, _CAPABILITY) != _getxattr(path, _CAPABILITY):
        return False
    if stat.S_ISDIR(st.st_mode):
        return True
    if base_st.st_size != st.st_size:
        return False
    (s1, n1), (s2, n2) = divmod(base_st.st_mtime_ns, 10**9), divmod(st.st_mtime_ns, 10**9)
    if s1 != s2 or n1 != n2:
        return False
    if n1:
        return True
    # Both times may have been truncated (unpacked from a tar): compare what they hold.
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(base) == os.readlink(path)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return True
    return _same_content(base, path)


class _Walk:
    """The tar of an upper directory's change against the lower tree `base`; with no lower
    tree, the tar of the whole directory, which is not an overlay's upper directory: a
    character device 0/0 is a device there, not a whiteout."""

    def __init__(self, upper: str, base: str | None) -> None:
        self._upper = upper
        self._base = base
        self._written_dirs: set[str] = set()
        self._links: dict[int, str] = {}
        self._seen: set[int] = set()
        self._tar: tarfile.TarFile | None = None

    @property
    def inodes(self) -> int:
        """The distinct inodes walked, the directory's own included (containerd's usage)."""
        return len(self._seen)

    def write(self, out: BinaryIO) -> None:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.copybufsize = _CHUNK  # type: ignore[attr-defined]
            self._tar = tar
            self._seen.add(os.lstat(self._upper).st_ino)
            self._walk("", opaque=False)

    def _walk(self, directory: str, *, opaque: bool) -> None:
        full_dir = os.path.join(self._upper, directory)
        with os.scandir(full_dir) as it:
            names = sorted(e.name for e in it)
        for name in names:
            rel = f"{directory}{name}"
            path = os.path.join(self._upper, rel)
            st = os.lstat(path)
            self._seen.add(st.st_ino)
            xattrs = _xattrs(path)
            if any(x in _UNREPRESENTABLE for x in xattrs):
                raise _Unrepresentable(f"{rel} is a redirect or a metadata-only copy")
            is_dir = stat.S_ISDIR(st.st_mode)
            if self._base is None:
                self._write(rel, path, st)
                if is_dir:
                    self._walk(rel + "/", opaque=False)
                continue
            if _whiteout(st):
                if not opaque and _lstat(os.path.join(self._base, rel)) is not None:
                    self._write_marker(directory, _WHITEOUT + name)
                continue
            base_path = os.path.join(self._base, rel)
            base_st = None if opaque else _lstat(base_path)
            linked = not is_dir and st.st_nlink > 1
            if base_st is None or linked or not _same(base_st, st, base_path, path):
                self._write(rel, path, st)
            if not is_dir:
                continue
            marked = any(x in _OPAQUE for x in xattrs) and any(
                _getxattr(path, x) == b"y" for x in _OPAQUE
            )
            if marked and base_st is not None:
                self._write_marker(rel + "/", _OPAQUE_WHITEOUT)
            self._walk(rel + "/", opaque=opaque or (marked and base_st is not None))

    def _parents(self, rel: str) -> None:
        """Writes the directories above `rel` that are not written yet, outermost first."""
        parts = rel.rstrip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self._written_dirs:
                path = os.path.join(self._upper, parent)
                self._write(parent, path, os.lstat(path))

    def _write_marker(self, directory: str, name: str) -> None:
        self._parents(directory + name)
        info = tarfile.TarInfo(directory + name)
        info.mode = 0
        info.uname = info.gname = ""
        assert self._tar is not None
        self._tar.addfile(info)

    def _write(self, rel: str, path: str, st: os.stat_result) -> None:
        assert self._tar is not None
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            return
        self._parents(rel)
        info = tarfile.TarInfo(rel)
        info.mode = stat.S_IMODE(mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = st.st_mtime_ns // 10**9
        capability = _getxattr(path, _CAPABILITY)
        if capability:
            value = capability.decode("utf-8", "surrogateescape")
            info.pax_headers = {"SCHILY.xattr." + _CAPABILITY: value}
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
            self._written_dirs.add(rel)
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            source = self._links.get(st.st_ino)
            if source is not None:
                info.type = tarfile.LNKTYPE
                info.linkname = source
                self._tar.addfile(info)
                return
            self._links[st.st_ino] = rel
        if not stat.S_ISREG(mode):
            self._tar.addfile(info)
            return
        with _open(path) as f:
            info.type = tarfile.REGTYPE
            info.size = os.fstat(f.fileno()).st_size
            if info.size != st.st_size:
                raise _Unrepresentable(f"{rel} changed while it was read")
            self._tar.addfile(info, f)
