"""Issue 6, full disks: the state directory's file system, and containerd's root, filled up
while the cache writes. Each write that finds no space fails with `NoSpaceError` naming the
file or the containerd call, leaves nothing half-written, and the same manager works again
once space returns."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from pyctrd_cache import CachePolicy, EmbeddedContainerd, Manager, NoSpaceError
from pyctrd_cache.client import Client
from tests.checks import gc
from tests.fix_containerd import SNAPSHOTTER, Daemon, Managers, clean_namespace
from tests.layers import make_tar
from tests.reliability import tally
from tests.reliability.test_store_damage import (
    check_records,
    left_after_prune,
    mounted_digest,
    owned_leases,
    populate,
    tree_digest,
)


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=False)


def fill(path: pathlib.Path, leave: int = 0) -> None:
    """Writes `path` until its file system has at most `leave` bytes free."""
    with open(path, "wb", buffering=0) as f:
        size = 1 << 20
        while size:
            st = os.statvfs(path.parent)
            n = min(size, st.f_bavail * st.f_frsize - leave)
            if n <= 0:
                return
            try:
                f.write(b"\0" * n)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                size //= 2


def test_full_state_directory(daemon: Daemon, managers: Managers, client: Client) -> None:
    with tmpfs(managers.state_dir, "2m"):
        cm = managers.open()
        try:
            trees = populate(cm, "full")
            base_id = next(iter(trees))
            pending = cm.new(cache_policy=CachePolicy.RETAIN)
            pending.apply(make_tar({"pending": b"pending"}))
            before = owned_leases(client, cm)
            snapshots = len(client.snapshots(SNAPSHOTTER).list())
            filler = managers.state_dir / "filler"
            fill(filler)
            db = str(cm.state_dir / "metadata.db")

            with pytest.raises(NoSpaceError, match=db):
                cm.new(cache_policy=CachePolicy.RETAIN)
            assert owned_leases(client, cm) == before
            assert len(client.snapshots(SNAPSHOTTER).list()) == snapshots
            with cm.get(base_id, update_last_used=False) as ref:
                with pytest.raises(NoSpaceError, match=db):
                    ref.set_description("changed")
                assert ref.description == "full base"
            with pytest.raises(NoSpaceError, match=db):
                pending.commit()
            assert cm.info(base_id).description == "full base"

            filler.unlink()
            with pending.commit() as done:
                done.finalize()
                trees[done.id] = {"pending": b"pending"}
                with cm.new(done) as more:
                    more.apply(make_tar({"more": b"more"}))
            with cm.get(base_id, update_last_used=False) as ref:
                ref.set_description("changed")
            lost = check_records(cm, client, trees)
            assert lost == 0
            cm.close()
            cm = managers.open()
            assert cm.info(base_id).description == "changed"
            assert check_records(cm, client, trees) == 0
            left = left_after_prune(cm, client, daemon)
        finally:
            cm.close()
    assert left == []
    tally.add("disk full", faults=1, clear_errors=1, recovered=1, leaks=len(left))


def test_full_containerd_root(daemon: Daemon, tmp_path: pathlib.Path) -> None:
    if daemon.embedded is None:
        pytest.skip("needs the binary of a daemon started by the test harness")
    binary = daemon.embedded.binary
    root_dir = pathlib.Path(tempfile.mkdtemp(prefix="ctrd-full-", dir="/tmp"))
    own = EmbeddedContainerd(root_dir, binary)
    try:
        with tmpfs(root_dir / "root", "64m") as root:
            own.start()
            try:
                with Client(own.address, namespace="full") as client:
                    try:
                        run_full_root(own, client, root, tmp_path / "state", daemon)
                    finally:
                        clean_namespace(client)
            finally:
                own.stop()
    finally:
        shutil.rmtree(root_dir, ignore_errors=True)


def run_full_root(
    own: EmbeddedContainerd,
    client: Client,
    root: pathlib.Path,
    state_dir: pathlib.Path,
    daemon: Daemon,
) -> None:
    cm = Manager.open(own.address, namespace="full", snapshotter=SNAPSHOTTER, state_dir=state_dir)
    try:
        filler = root / "filler"
        fill(filler, leave=8 << 20)
        big = {"big": os.urandom(16 << 20)}
        work = cm.new(cache_policy=CachePolicy.RETAIN)
        with pytest.raises(NoSpaceError, match="no space left on device") as info:
            work.apply(make_tar(big))
        assert info.value.rpc
        # Nothing half-written: no ingest, no blob, only the record's own lease.
        gc(client)
        assert client.content.list_statuses() == []
        assert client.content.list() == []
        assert {lease.id for lease in client.leases.list()} == {work.id}
        # Not even a snapshot fits: the new record is undone.
        fill(root / "more")
        with pytest.raises(NoSpaceError, match="no space left on device"):
            cm.new()
        (root / "more").unlink()
        assert owned_leases(client, cm) <= {md.id for md in cm._store.all()}
        assert [s.name for s in client.snapshots(SNAPSHOTTER).list()] == [work.id]

        filler.unlink()
        work.apply(make_tar(big))
        with work.commit() as done:
            done.finalize()
            with done.mount() as mounted:
                assert mounted_digest(mounted) == tree_digest(big)
            done_id = done.id
        assert check_records(cm, client, {done_id: big}) == 0
        mine = Daemon(daemon.name, own.address, daemon.version, own, daemon.ctr)
        left = left_after_prune(cm, client, mine)
    finally:
        cm.close()
    assert left == []
    tally.add("disk full", faults=1, clear_errors=1, recovered=1, leaks=len(left))
