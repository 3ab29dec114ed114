# Each change of CHANGES is one lambda whose steps, calls returning None, sit in a tuple.
# mypy: disable-error-code="func-returns-value"
"""The layer written from an overlay upper directory against the diff service's layer: for
each change of a matrix, both layers applied onto fresh snapshots of the same parent give
the same tree; each condition the route cannot trust falls back to the diff service; zstd
on daemons that cannot diff to it leaves no intermediate blob."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyctrd_cache import Compression, Descriptor, ImmutableRef, Manager
from pyctrd_cache.client import Client
from tests.checks import gc
from tests.fix_containerd import Daemon, Managers
from tests.layers import TAR, TAR_ZSTD

UPPER_ROUTE = "written from its upper directory"
LOGGER = "pyctrd_cache.blobs"
# A file capability (cap_net_raw, effective), in the kernel's v2 format.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
FILLERS = 64


def write(path: pathlib.Path, data: bytes, mtime_ns: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def make_base(root: pathlib.Path) -> None:
    """The parent's tree: enough entries below the change for the route to be the cheaper
    one, and one of every kind the changes touch."""
    for i in range(FILLERS):
        write(root / "fill" / f"f{i:03d}", b"x" * 10)
    write(root / "a.txt", b"a\n", 1_600_000_000_123_456_789)
    write(root / "whole.txt", b"whole seconds\n", 1_600_000_000_000_000_000)
    write(root / "d" / "f1", b"one\n")
    write(root / "d" / "f2", b"two\n")
    write(root / "deldir" / "sub" / "x", b"x\n")
    write(root / "opq" / "old1", b"old1\n")
    write(root / "opq" / "sub" / "old2", b"old2\n")
    write(root / "ren.txt", b"rename me\n")
    write(root / "rendir" / "in" / "y", b"y\n")
    write(root / "perm.txt", b"perm\n")
    write(root / "cap.txt", b"cap\n")
    write(root / "xattr.txt", b"xattr\n")
    os.setxattr(root / "xattr.txt", "user.note", b"base")
    write(root / "link-a", b"linked\n")
    os.link(root / "link-a", root / "link-b")
    os.symlink("a.txt", root / "sym")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "fifo")
    write(root / "file2dir", b"becomes a directory\n")
    write(root / "dir2file" / "inner", b"inner\n")
    write(root / "touched", b"touched\n", 1_600_000_000_500_000_000)
    write(root / "copied-up", b"copied up\n", 1_600_000_000_700_000_000)


def _mv(src: pathlib.Path, dst: pathlib.Path) -> None:
    """`mv`: a directory of a lower layer moves by copy and delete (no `redirect_dir`)."""
    subprocess.run(["mv", str(src), str(dst)], check=True)


CHANGES: dict[str, Callable[[pathlib.Path], object]] = {
    "added": lambda r: (
        write(r / "new.txt", b"new\n"),
        write(r / "d" / "new", b"new in d\n"),
        write(r / "newdir" / "deep" / "z", b"z\n"),
    ),
    "modified": lambda r: write(r / "d" / "f1", b"one, modified\n"),
    "deleted-file": lambda r: (r / "d" / "f2").unlink(),
    "deleted-dir": lambda r: shutil.rmtree(r / "deldir"),
    "opaque-dir": lambda r: (
        shutil.rmtree(r / "opq"),
        (r / "opq").mkdir(),
        write(r / "opq" / "fresh", b"fresh\n"),
        write(r / "opq" / "sub" / "old2", b"old2\n"),
    ),
    "renamed-file": lambda r: _mv(r / "ren.txt", r / "renamed.txt"),
    "renamed-dir": lambda r: _mv(r / "rendir", r / "rendir2"),
    "hard-links": lambda r: (
        write(r / "n1", b"n\n"),
        os.link(r / "n1", r / "n2"),
        os.link(r / "a.txt", r / "a-link"),
        write(r / "link-a", b"rewritten\n"),
    ),
    "symlinks": lambda r: (
        os.symlink("d/f1", r / "newsym"),
        (r / "sym").unlink(),
        os.symlink("whole.txt", r / "sym"),
    ),
    "xattrs": lambda r: (
        os.setxattr(r / "cap.txt", "security.capability", CAPABILITY),
        write(r / "capnew", b"capnew\n"),
        os.setxattr(r / "capnew", "security.capability", CAPABILITY),
        os.setxattr(r / "xattr.txt", "user.note", b"changed"),
    ),
    "permissions": lambda r: (
        os.chmod(r / "perm.txt", 0o4711),
        os.chown(r / "a.txt", 1000, 1001),
        os.chmod(r / "d", 0o700),
    ),
    "devices": lambda r: (
        os.mknod(r / "zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5)),
        os.mknod(r / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 0)),
        os.mkfifo(r / "fifo2"),
        (r / "null").unlink(),
    ),
    "type-changes": lambda r: (
        (r / "file2dir").unlink(),
        write(r / "file2dir" / "now", b"a directory\n"),
        shutil.rmtree(r / "dir2file"),
        write(r / "dir2file", b"a file\n"),
    ),
    "unchanged-copies": lambda r: (
        os.utime(r / "touched", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000)),
        open(r / "copied-up", "r+b").close(),
        write(r / "d" / "transient", b"gone again\n"),
        (r / "d" / "transient").unlink(),
    ),
}


def tree(root: pathlib.Path) -> dict[str, Any]:
    """Every entry below `root`: type and mode, owner, content or link target or device
    number, extended attributes, the mtime of non-directories (a directory's is the time of
    the application for one the layer does not name); and the groups of hard links."""
    entries: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            what: Any = None
            if stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                what = (os.major(st.st_rdev), os.minor(st.st_rdev))
            xattrs = {
                n: os.getxattr(path, n, follow_symlinks=False)
                for n in sorted(os.listxattr(path, follow_symlinks=False))
            }
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            entries[rel] = (st.st_mode, st.st_uid, st.st_gid, what, xattrs, mtime)
    entries["hard link groups"] = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return entries


def applied_tree(cm: Manager, parent: ImmutableRef | None, desc: Descriptor) -> dict[str, Any]:
    work = cm.new(parent)
    try:
        work.apply(desc)
        with work.mount() as root:
            return tree(root)
    finally:
        work.release()


@pytest.fixture
def base(managers: Managers) -> Iterator[tuple[Manager, ImmutableRef]]:
    cm = managers.open()
    work = cm.new()
    with work.mount(readonly=False) as root:
        make_base(root)
    ref = work.commit()
    ref.finalize()
    yield cm, ref
    ref.release()


def changed(
    cm: Manager, parent: ImmutableRef, change: Callable[[pathlib.Path], object]
) -> ImmutableRef:
    work = cm.new(parent)
    with work.mount(readonly=False) as root:
        change(root)
    snap = work.commit()
    snap.finalize()
    return snap


def service_layer(client: Client, cm: Manager, snap: ImmutableRef, lease: str) -> Descriptor:
    """The diff service's layer of `snap`, held by `lease`."""
    leased = client.with_lease(lease)
    sn = leased.snapshots(cm.snapshotter)
    parent = snap.parent()
    assert parent is not None
    try:
        lower = sn.view(f"lower-{lease}", parent.info().snapshot_id)
        upper = sn.view(f"upper-{lease}", snap.info().snapshot_id)
        return leased.diff.diff(lower, upper, media_type=TAR)
    finally:
        parent.release()
        for key in (f"lower-{lease}", f"upper-{lease}"):
            sn.remove(key)


@pytest.mark.parametrize("case", sorted(CHANGES))
def test_upper_layer_applies_like_the_diff_service_layer(
    base: tuple[Manager, ImmutableRef],
    client: Client,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    cm, parent = base
    snap = changed(cm, parent, CHANGES[case])
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    (ours,) = snap.get_remote(compression=Compression.UNCOMPRESSED).descriptors[-1:]
    assert UPPER_ROUTE in caplog.text
    lease = client.leases.create(flat=True).id
    try:
        theirs = service_layer(client, cm, snap, lease)
        expected = applied_tree(cm, parent, theirs)
        assert applied_tree(cm, parent, ours) == expected
        with snap.mount() as root:
            assert tree(root)["hard link groups"] == expected["hard link groups"]
    finally:
        client.leases.delete(lease)
    snap.release()


def upper_of(snap: ImmutableRef) -> pathlib.Path:
    """The snapshot's own directory: the topmost lower directory of its read-only overlay."""
    (m,) = snap.mounts(readonly=True)
    lowers = next(o for o in m.options if o.startswith("lowerdir="))
    return pathlib.Path(lowers.removeprefix("lowerdir=").split(":")[0])


@pytest.mark.parametrize(
    ("name", "tamper", "reason"),
    [
        # The user.overlay names: the kernel, on a mount without `userxattr`, ignores them.
        ("redirect", lambda u: os.setxattr(u / "d", "user.overlay.redirect", b"d"), "redirect"),
        (
            "metacopy",
            lambda u: os.setxattr(u / "d" / "f1", "user.overlay.metacopy", b""),
            "metadata-only",
        ),
        ("foreign", lambda u: write(u / "stray", b"not containerd's\n"), "not the snapshot's"),
    ],
)
def test_what_the_route_cannot_trust_falls_back(
    base: tuple[Manager, ImmutableRef],
    client: Client,
    caplog: pytest.LogCaptureFixture,
    name: str,
    tamper: Callable[[pathlib.Path], object],
    reason: str,
) -> None:
    """A redirect or metadata-only copy in the upper directory, or a directory that is not
    the one containerd counted, makes the diff service write the layer, and no partial blob
    of the route is left."""
    del name
    cm, parent = base
    snap = changed(cm, parent, CHANGES["modified"])
    tamper(upper_of(snap))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    (desc,) = snap.get_remote(compression=Compression.UNCOMPRESSED).descriptors[-1:]
    assert UPPER_ROUTE not in caplog.text
    assert reason in caplog.text
    assert client.content.list_statuses() == []
    lease = client.leases.create(flat=True).id
    try:
        assert desc.digest == service_layer(client, cm, snap, lease).digest
    finally:
        client.leases.delete(lease)
    snap.release()


def test_no_parent_and_other_snapshotters_use_the_diff_service(
    managers: Managers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    for snapshotter, reason in (("overlayfs", "no parent"), ("native", "not one overlay")):
        cm = Manager.open(
            managers.daemon.address,
            namespace=managers.namespace,
            snapshotter=snapshotter,
            state_dir=managers.state_dir / snapshotter,
        )
        try:
            work = cm.new()
            with work.mount(readonly=False) as root:
                make_base(root)
            parent = work.commit()
            parent.finalize()
            snap = changed(cm, parent, CHANGES["added"])
            (parent if snapshotter == "overlayfs" else snap).get_remote()
            assert UPPER_ROUTE not in caplog.text
            assert reason in caplog.text
            snap.release()
            parent.release()
        finally:
            cm.close()


def test_a_large_change_on_a_small_base_uses_the_diff_service(
    managers: Managers, caplog: pytest.LogCaptureFixture, daemon: Daemon, client: Client
) -> None:
    """The diff service writes bytes faster than they stream from here: a change of many
    bytes on few entries goes to it, unless it cannot write the compression (zstd before
    containerd 1.7.29), where the route is always taken and nothing but the zstd blobs
    survives a collection."""
    cm = managers.open()
    work = cm.new()
    with work.mount(readonly=False) as root:
        write(root / "one", b"1")
    parent = work.commit()
    snap = changed(cm, parent, lambda r: write(r / "big", os.urandom(1 << 20)))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    snap.get_remote(compression=Compression.GZIP)
    assert UPPER_ROUTE not in caplog.text
    remote = snap.get_remote(compression=Compression.ZSTD, force_compression=True)
    assert [d.media_type for d in remote.descriptors] == [TAR_ZSTD, TAR_ZSTD]
    if daemon.version < (2, 0, 1):
        gc(client)
        before = {i.digest for i in client.content.list()}
        other = changed(cm, parent, lambda r: write(r / "big", os.urandom(1 << 20)))
        caplog.clear()
        zstd = other.get_remote(compression=Compression.ZSTD).descriptors[-1]
        assert UPPER_ROUTE in caplog.text
        assert (other.info().blob, other.info().media_type) == (zstd.digest, TAR_ZSTD)
        gc(client)
        assert {i.digest for i in client.content.list()} - before == {zstd.digest}
        other.release()
    snap.release()
    parent.release()


def test_a_base_layer_in_zstd_is_written_here_where_the_daemon_cannot(
    managers: Managers, client: Client, daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot without a parent is a plain directory, a character device 0/0 in it a
    device: containerd 2.x diffs it to zstd itself; 1.6 and 1.7 get the directory written
    here, and the layer applies to the diff service's tree."""
    cm = managers.open()
    work = cm.new()
    with work.mount(readonly=False) as root:
        make_base(root)
        os.mknod(root / "zero-zero", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    snap = work.commit()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    (ours,) = snap.get_remote(compression=Compression.ZSTD).descriptors
    assert ours.media_type == TAR_ZSTD
    assert (UPPER_ROUTE in caplog.text) is (daemon.version < (2, 0, 1))
    lease = client.leases.create(flat=True).id
    try:
        leased = client.with_lease(lease)
        sn = leased.snapshots(cm.snapshotter)
        upper = sn.view(f"upper-{lease}", snap.info().snapshot_id)
        try:
            theirs = leased.diff.diff([], upper, media_type=TAR)
        finally:
            sn.remove(f"upper-{lease}")
        expected = applied_tree(cm, None, theirs)
        assert expected["zero-zero"][3] == (0, 0)
        assert applied_tree(cm, None, ours) == expected
    finally:
        client.leases.delete(lease)
    snap.release()


def test_a_change_on_a_chain_of_layers(
    base: tuple[Manager, ImmutableRef], client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """On a parent of several layers the lower tree is an overlay mounted here: entries of
    either layer below are deleted, replaced and changed."""
    cm, bottom = base

    def middle_change(r: pathlib.Path) -> None:
        (r / "d" / "f2").unlink()
        write(r / "middle" / "m", b"middle\n")
        os.chmod(r / "perm.txt", 0o600)

    def top_change(r: pathlib.Path) -> None:
        write(r / "d" / "f2", b"back again\n")
        shutil.rmtree(r / "middle")
        shutil.rmtree(r / "opq")
        write(r / "opq" / "fresh", b"fresh\n")
        (r / "a.txt").unlink()
        write(r / "perm.txt", b"perm, rewritten\n")

    middle = changed(cm, bottom, middle_change)
    top = changed(cm, middle, top_change)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    ours = top.get_remote(compression=Compression.UNCOMPRESSED).descriptors[-1]
    assert caplog.text.count(UPPER_ROUTE) == 2
    lease = client.leases.create(flat=True).id
    try:
        expected = applied_tree(cm, middle, service_layer(client, cm, top, lease))
        assert applied_tree(cm, middle, ours) == expected
    finally:
        client.leases.delete(lease)
    top.release()
    middle.release()
