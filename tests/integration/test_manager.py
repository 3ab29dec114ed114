"""Ports of BuildKit's TestManager, TestLazyCommit and TestPrune, and more of the life cycle,
against real containerd daemons."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Mapping
from datetime import UTC, datetime

import pytest

from pyctrd_cache import (
    CachePolicy,
    InvalidError,
    LockedError,
    NotFoundError,
    PrunePolicy,
    RecordType,
    UnavailableError,
)
from pyctrd_cache.client import Client, SnapshotKind
from pyctrd_cache.client.snapshots import SnapshotsService
from pyctrd_cache.manager import OWNER_LABEL
from pyctrd_cache.mounts import readonly_mounts
from tests.checks import check_disk_usage, owned_leases, snapshot_names
from tests.fix_containerd import SNAPSHOTTER, Daemon, Managers


def test_manager(managers: Managers, client: Client) -> None:
    cm = managers.open()

    with pytest.raises(NotFoundError):
        cm.get("foobar")
    check_disk_usage(cm, 0, 0)

    active = cm.new(cache_policy=CachePolicy.RETAIN)
    with active.mount(readonly=False) as target:
        assert target.is_dir()
        (target / "hello").write_text("world")
    with pytest.raises(LockedError):
        cm.get_mutable(active.id)
    check_disk_usage(cm, 1, 0)

    snap = active.commit()
    check_disk_usage(cm, 1, 0)
    with pytest.raises(LockedError):
        cm.get_mutable(active.id)

    snap.release()
    check_disk_usage(cm, 0, 1)

    active = cm.get_mutable(active.id)
    check_disk_usage(cm, 1, 0)

    snap = active.commit()
    check_disk_usage(cm, 1, 0)
    snap.finalize()
    snap.release()

    with pytest.raises(NotFoundError):
        cm.get_mutable(active.id)
    with pytest.raises(InvalidError):
        cm.get_mutable(snap.id)

    snap = cm.get(snap.id)
    snap2 = cm.get(snap.id)
    check_disk_usage(cm, 1, 0)
    with snap.mount() as target:
        assert (target / "hello").read_text() == "world"
    snap.release()

    active2 = cm.new(snap2, cache_policy=CachePolicy.RETAIN)
    check_disk_usage(cm, 2, 0)

    snap3 = active2.commit()
    snap2.release()
    check_disk_usage(cm, 2, 0)

    snap3.release()
    check_disk_usage(cm, 0, 2)

    removed = cm.prune()
    check_disk_usage(cm, 0, 0)
    assert len(removed) == 2

    cm.close()
    assert snapshot_names(client) == []
    assert client.leases.list() == []


def test_lazy_commit(managers: Managers, client: Client) -> None:
    cm = managers.open()

    active = cm.new(cache_policy=CachePolicy.RETAIN)
    # after commit the mutable is locked
    snap = active.commit()
    with pytest.raises(LockedError):
        cm.get_mutable(active.id)

    # immutable refs still work
    snap2 = cm.get(snap.id)
    assert snap2.id == snap.id
    snap.release()
    snap2.release()

    # immutable works after the final release as well
    snap = cm.get(snap.id)
    assert snap.id == snap2.id

    # the mutable can't be had while the immutable is held
    with pytest.raises(LockedError):
        cm.get_mutable(active.id)
    snap.release()

    # after release the mutable becomes available again
    active2 = cm.get_mutable(active.id)
    assert active2.id == active.id

    # because the mutable was taken, the old immutable is cleared
    with pytest.raises(NotFoundError):
        cm.get(snap.id)

    snap = active2.commit()
    # this time finalize the commit
    snap.finalize()
    snap.release()

    # the mutable is gone after finalize
    with pytest.raises(NotFoundError):
        cm.get_mutable(active2.id)

    # the immutable still works
    snap2 = cm.get(snap.id)
    assert snap2.id == snap.id
    snap2.release()

    # restart after a commit
    active = cm.new(cache_policy=CachePolicy.RETAIN)
    snap = active.commit()
    cm.close()

    cm = managers.open()
    snap2 = cm.get(snap.id)
    snap2.release()

    active = cm.get_mutable(active.id)
    with pytest.raises(NotFoundError):
        cm.get(snap.id)
    snap = active.commit()
    cm.close()

    cm = managers.open()
    snap2 = cm.get(snap.id)
    snap2.finalize()
    snap2.release()

    with pytest.raises(NotFoundError):
        cm.get_mutable(active.id)
    cm.close()

    # the finalized record survives a restart, and each record has just its own lease
    cm = managers.open()
    with cm.get(snap.id) as ref:
        assert not ref.info().mutable
        assert ref.info().equal_mutable_id is None
        assert ref.info().snapshot_id == snap.id
    assert owned_leases(client, cm) == sorted(u.id for u in cm.disk_usage())


def test_prune(managers: Managers, client: Client) -> None:
    cm = managers.open()

    active = cm.new()
    snap = active.commit()
    active = cm.new(snap, cache_policy=CachePolicy.RETAIN)
    snap2 = active.commit()
    check_disk_usage(cm, 2, 0)
    assert len(snapshot_names(client)) == 2

    # prune with keeping refs does nothing
    assert cm.prune() == []
    check_disk_usage(cm, 2, 0)
    assert len(snapshot_names(client)) == 2

    snap2.release()
    check_disk_usage(cm, 1, 1)

    # prune with keeping single refs deletes one
    removed = cm.prune()
    check_disk_usage(cm, 1, 0)
    assert len(removed) == 1
    assert len(snapshot_names(client)) == 1

    snap.release()
    # BuildKit's test builds on the released ref; here a released ref is dead, so take a
    # new one for the parent.
    parent = cm.get(snap.id)
    active = cm.new(parent, cache_policy=CachePolicy.RETAIN)
    snap2 = active.commit()
    parent.release()
    check_disk_usage(cm, 2, 0)

    # prune with the parent released does nothing
    assert cm.prune() == []
    check_disk_usage(cm, 2, 0)

    # releasing the last reference
    snap2.release()
    check_disk_usage(cm, 0, 2)

    removed = cm.prune()
    check_disk_usage(cm, 0, 0)
    assert len(removed) == 2
    assert removed[0].id != removed[1].id
    assert snapshot_names(client) == []
    assert owned_leases(client, cm) == []


def test_release_twice_is_invalid(managers: Managers) -> None:
    cm = managers.open()
    active = cm.new()
    snap = active.commit()
    with pytest.raises(InvalidError):
        active.release()  # it passed into the immutable ref
    snap.release()
    with pytest.raises(InvalidError):
        snap.release()
    other = cm.new()
    other.release()
    with pytest.raises(InvalidError):
        other.release()


def test_releasing_a_default_mutable_removes_it_and_its_twin(
    managers: Managers, client: Client
) -> None:
    cm = managers.open()
    active = cm.new()
    active_id = active.id
    snap = active.commit()
    snap.release()
    with pytest.raises(NotFoundError):
        cm.get(snap.id)
    with pytest.raises(NotFoundError):
        cm.get_mutable(active_id)
    assert owned_leases(client, cm) == []
    assert cm.disk_usage() == []


def test_a_finalize_cut_off_by_an_outage_leaves_no_lease_behind_its_removal(
    managers: Managers, client: Client, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # containerd goes down between the finalize's lease and its commit, and stays down while
    # the finalize tries to delete that lease again; the record's removal must delete it.
    embedded = daemon.restartable()
    cm = managers.open()
    snap = cm.new().commit()
    transport = cm._core.client._t
    real_commit = SnapshotsService.commit

    def commit_after_outage(
        self: SnapshotsService, name: str, key: str, *, labels: Mapping[str, str] | None = None
    ) -> None:
        embedded.stop()
        real_commit(self, name, key, labels=labels)

    monkeypatch.setattr(SnapshotsService, "commit", commit_after_outage)
    monkeypatch.setattr(transport, "retry_budget", 0.5)
    try:
        with pytest.raises(UnavailableError):
            snap.finalize()
    finally:
        monkeypatch.undo()
        embedded.start()
    assert snap.id in owned_leases(client, cm)

    snap.release()
    assert owned_leases(client, cm) == []
    cm.close()
    again = managers.open()
    assert again.disk_usage() == []
    assert owned_leases(client, again) == []


def test_retain_policy_keeps_a_released_mutable(managers: Managers) -> None:
    cm = managers.open()
    active = cm.new(cache_policy=CachePolicy.RETAIN, description="kept")
    active.release()
    again = cm.get_mutable(active.id)
    assert again.description == "kept"
    assert again.usage_count == 1
    again.release()


def test_metadata_setters_persist(managers: Managers) -> None:
    started = datetime.now(UTC)
    cm = managers.open()
    created = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    active = cm.new(
        cache_policy=CachePolicy.DEFAULT,
        description="first",
        record_type=RecordType.CACHE_MOUNT,
        created_at=created,
    )
    assert active.record_type is RecordType.CACHE_MOUNT
    assert active.created_at == created
    snap = active.commit()
    snap.set_description("second")
    snap.set_record_type(RecordType.INTERNAL)
    snap.set_layer_type("windows")
    assert snap.info().cache_policy is CachePolicy.DEFAULT
    snap.set_cache_policy(CachePolicy.RETAIN)
    snap.set_external("k", b"\x00\x01")
    with pytest.raises(NotFoundError):
        snap.get_external("missing")
    record_id = snap.id
    snap.finalize()
    snap.release()
    cm.close()

    cm = managers.open()
    with cm.get(record_id) as ref:
        info = ref.info()
        assert (info.description, info.record_type, info.layer_type) == (
            "second",
            RecordType.INTERNAL,
            "windows",
        )
        assert info.cache_policy is CachePolicy.RETAIN
        assert ref.get_external("k") == b"\x00\x01"
        assert info.usage_count == 1
        assert info.last_used_at is not None
        assert started <= info.last_used_at <= datetime.now(UTC)


def test_size_counts_snapshot_usage_once_and_is_cached(managers: Managers) -> None:
    cm = managers.open()
    active = cm.new()
    with active.mount(readonly=False) as target:
        (target / "data").write_bytes(os.urandom(1 << 20))
    snap = active.commit()
    size = snap.size()
    assert size >= 1 << 20
    assert snap.info().size == size
    assert snap.size() == size
    usage = cm.disk_usage()
    assert [u.size for u in usage] == [size]
    snap.release()


def test_immutable_mounts_are_views_dropped_with_the_last_ref(
    managers: Managers, client: Client
) -> None:
    cm = managers.open()
    active = cm.new()
    with active.mount(readonly=False) as target:
        (target / "f").write_text("x")
    snap = active.commit()
    # While the equal mutable exists, read-only mounts use its snapshot.
    ro = snap.mounts(readonly=True)
    assert all("rw" not in m.options for m in ro)
    twin = snap.clone()
    view = snap.mounts(readonly=False)
    assert view == twin.mounts(readonly=False)
    kinds = {s.name: s.kind for s in client.snapshots(SNAPSHOTTER).list()}
    assert SnapshotKind.VIEW in kinds.values()
    snap.release()
    assert SnapshotKind.VIEW in {s.kind for s in client.snapshots(SNAPSHOTTER).list()}
    twin.release()
    assert len(owned_leases(client, cm)) == 1  # only the record's own lease
    with cm.get(snap.id) as again, again.mount() as target:
        assert (target / "f").read_text() == "x"
        with pytest.raises(OSError):  # noqa: PT011 - read-only file system
            (target / "g").write_text("y")


def test_readonly_mounts_rewrite_overlay_and_bind_options() -> None:
    from pyctrd_cache import Mount

    overlay = Mount(
        "overlay", "overlay", ("index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2")
    )
    bind = Mount("bind", "/s", ("rw", "rbind"))
    assert readonly_mounts([overlay, bind]) == [
        Mount("overlay", "overlay", ("index=off", "lowerdir=/u:/l1:/l2")),
        Mount("bind", "/s", ("rbind", "ro")),
    ]


def test_state_directory_is_private_and_shared(managers: Managers) -> None:
    old = os.umask(0)
    try:
        cm = managers.open()
        other = managers.open()  # any number of managers share the directory
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(cm.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cm.state_dir / "metadata.db").st_mode) == 0o600
    sessions = cm.state_dir / "sessions"
    assert stat.S_IMODE(os.stat(sessions).st_mode) == 0o700
    assert sorted(p.name for p in sessions.iterdir()) == sorted(
        [cm._core.session, other._core.session]
    )
    assert {stat.S_IMODE(p.stat().st_mode) for p in sessions.iterdir()} == {0o600}
    other.close()
    assert [p.name for p in sessions.iterdir()] == [cm._core.session]
    cm.close()
    # A holder of the exclusive lock (a single-process version holds it while open) refuses.
    fd = os.open(managers.state_dir / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(LockedError, match="in use by another open manager"):
            managers.open()
    finally:
        os.close(fd)
    managers.open().close()


def test_open_drops_leases_and_rows_without_their_counterpart(
    managers: Managers, client: Client
) -> None:
    cm = managers.open()
    kept = cm.new(cache_policy=CachePolicy.RETAIN)
    kept.release()
    manager_id = cm.manager_id
    cm.close()
    # A lease of this manager that no row accounts for (a crash between lease and row).
    client.leases.create("orphan", labels={OWNER_LABEL: manager_id})
    # A row whose containerd objects are gone.
    client.leases.delete(kept.id, sync=True)

    cm = managers.open()
    assert owned_leases(client, cm) == []
    with pytest.raises(NotFoundError):
        cm.get_mutable(kept.id)
    assert cm.disk_usage() == []


@pytest.mark.parametrize("kind", ["view", "record"])
def test_a_lease_created_after_open_by_an_earlier_opening_goes_at_the_next_prune(
    managers: Managers, client: Client, kind: str
) -> None:
    # A killed process's call that reaches containerd only after the next open listed the
    # leases: the lease carries the dead opening's session.
    cm = managers.open()
    kept = cm.new(cache_policy=CachePolicy.RETAIN)
    kept.release()
    labels = {OWNER_LABEL: cm.manager_id, "pyctrd-cache/kind": kind}
    client.leases.create("late", labels={**labels, "pyctrd-cache/session": "dead"})
    with cm.lease() as own:
        cm.prune(PrunePolicy(filters=("id==nothing",)))
        assert owned_leases(client, cm) == sorted([kept.id, own])
    cm.close()
    managers.open().close()  # a record lease without a row would be StoreDamagedError here


def test_managers_with_separate_state_share_a_namespace(
    managers: Managers, client: Client, tmp_path: os.PathLike[str]
) -> None:
    one = managers.open()
    two = managers.open(managers.state_dir.with_name("other"))
    a = one.new(cache_policy=CachePolicy.RETAIN)
    b = two.new(cache_policy=CachePolicy.RETAIN)
    a.release()
    b.release()
    one.close()
    # Reopening one must not take the other's leases for orphans.
    one = managers.open()
    assert owned_leases(client, two) == [b.id]
    assert owned_leases(client, one) == [a.id]
