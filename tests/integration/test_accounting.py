"""Space accounting that users act on: sizes after writes, prunes that free what they say,
size bounds on deduplicated totals, filters that refuse typos, dry runs, and what counts as
a use (issue 15)."""

from __future__ import annotations

import os
import time

import pytest

from pyctrd_cache import (
    CachePolicy,
    DescHandler,
    Descriptor,
    ImmutableRef,
    InvalidError,
    Manager,
    NeedsRemoteProvidersError,
    PrunePolicy,
    UsageInfo,
)
from pyctrd_cache.cache.refs import _Record
from pyctrd_cache.client import Client
from tests.checks import blob_count, snapshot_names
from tests.cli_runs import Cli, one_line_error
from tests.fix_containerd import SNAPSHOTTER, Daemon, Managers
from tests.layers import TAR, TAR_GZIP, BytesProvider, compress, digest_of, layer, make_tar

MiB = 1 << 20


def record_with(cm: Manager, size: int, parent: ImmutableRef | None = None) -> ImmutableRef:
    """A finalized record holding one file of `size` random bytes."""
    work = cm.new(parent)
    work.apply(make_tar({f"data-{os.urandom(4).hex()}": os.urandom(size)}))
    snap = work.commit()
    snap.finalize()
    return snap


def sizes(cm: Manager) -> dict[str, int]:
    return {u.id: u.size for u in cm.disk_usage()}


def total(cm: Manager) -> int:
    return sum(u.size for u in cm.disk_usage())


def ids(infos: list[UsageInfo]) -> list[str]:
    return [i.id for i in infos]


def test_a_mutable_size_follows_writes(managers: Managers) -> None:
    cm = managers.open()
    work = cm.new(cache_policy=CachePolicy.RETAIN)
    assert sizes(cm)[work.id] == 0  # in use: not measured
    with work.mount(readonly=False) as root:
        (root / "two").write_bytes(os.urandom(2 * MiB))
    work.release()
    assert sizes(cm)[work.id] >= 2 * MiB

    again = cm.get_mutable(work.id)
    again.apply(make_tar({"three": os.urandom(3 * MiB)}))
    assert cm.disk_usage()[0].size == 0  # in use again
    again.release()
    assert sizes(cm)[work.id] >= 5 * MiB

    # The prune reports the size after the last write, and frees all of it.
    removed = cm.prune(PrunePolicy(keep_bytes=1))
    assert ids(removed) == [work.id]
    assert removed[0].size >= 5 * MiB
    assert cm.disk_usage() == []


def test_an_immutable_size_counts_variants_made_later(managers: Managers) -> None:
    cm = managers.open()
    ref = record_with(cm, MiB)
    before = ref.size()
    ref.get_remote(create_if_needed=True)  # makes a gzip blob
    assert ref.size() > before
    ref.release()


def test_a_prune_collects_what_released_records_left(managers: Managers, client: Client) -> None:
    cm = managers.open()
    work = cm.new()
    with work.mount(readonly=False) as root:
        (root / "four").write_bytes(os.urandom(4 * MiB))
    work.release()  # a default-policy mutable goes at release
    assert cm.disk_usage() == []
    assert cm.prune() == []
    assert snapshot_names(client) == []
    assert blob_count(client) == 0


def _linked_pair(cm: Manager) -> tuple[ImmutableRef, ImmutableRef, int]:
    """Two records of one layer in two compressions, sharing one extracted snapshot."""
    tar = make_tar({"shared": os.urandom(MiB)})
    diff_id = digest_of(tar)
    blobs = {mt: compress(tar, mt) for mt in (TAR, TAR_GZIP)}
    descs = {
        mt: Descriptor(mt, digest_of(b), len(b), {"containerd.io/uncompressed": diff_id})
        for mt, b in blobs.items()
    }
    dhs = {d.digest: DescHandler(BytesProvider(*blobs.values())) for d in descs.values()}
    first = cm.get_by_blob(descs[TAR], desc_handlers=dhs)
    first.extract()
    second = cm.get_by_blob(descs[TAR_GZIP], desc_handlers=dhs)
    second.extract()
    assert second.info().snapshot_id == first.info().snapshot_id
    return first, second, len(blobs[TAR_GZIP])


def test_keep_bytes_counts_a_shared_snapshot_once_on_both_sides(
    managers: Managers, client: Client
) -> None:
    cm = managers.open()
    first, second, _ = _linked_pair(cm)
    first.release()
    second.release()
    assert total(cm) >= MiB
    removed = cm.prune(PrunePolicy(keep_bytes=400_000))
    assert len(removed) == 2
    assert total(cm) <= 400_000
    assert snapshot_names(client) == []
    # What the prune reported freed is what there was.
    assert sum(u.size for u in removed) >= MiB


def test_the_free_space_policy_counts_a_shared_snapshot_once(managers: Managers) -> None:
    cm = managers.open()
    first, second, _ = _linked_pair(cm)
    first.release()
    second.release()
    cm.prune(PrunePolicy(max_used_space=400_000))
    assert total(cm) <= 400_000


def test_a_prune_reports_the_bytes_each_removal_freed(managers: Managers, client: Client) -> None:
    cm = managers.open()
    first, second, _ = _linked_pair(cm)
    snapshot_id = first.info().snapshot_id
    first.release()
    second.release()
    usage = client.snapshots(SNAPSHOTTER).usage(snapshot_id).size
    before = total(cm)
    removed = cm.prune(PrunePolicy(all=True))
    assert sum(u.size for u in removed) == before
    # The record that went first freed only its blobs: the other still held the snapshot.
    assert removed[0].size <= before - usage


def test_keep_bytes_reranks_when_a_parent_becomes_a_candidate(managers: Managers) -> None:
    """Removing a child makes its parent, used long ago, go before records used since."""
    cm = managers.open()
    parent = record_with(cm, MiB)
    child = record_with(cm, MiB, parent)
    parent.release()
    child.release()
    recent = [record_with(cm, MiB) for _ in range(3)]
    for ref in recent:
        ref.release()
    for ref in recent:
        cm.get(ref.id).release()
    usage = sizes(cm)
    keep = sum(usage[r.id] for r in recent) + 1000
    removed = cm.prune(PrunePolicy(keep_bytes=keep))
    assert ids(removed) == [child.id, parent.id]


def test_dry_run_reports_exactly_what_a_prune_removes(managers: Managers, client: Client) -> None:
    cm = managers.open()
    parent = record_with(cm, MiB)
    child = record_with(cm, MiB, parent)
    other = record_with(cm, 2 * MiB)
    first, second, _ = _linked_pair(cm)
    for ref in (parent, child, other, first, second):
        ref.release()
    before_du = cm.disk_usage()
    before_snapshots = snapshot_names(client)
    for policy in (PrunePolicy(keep_bytes=3 * MiB), PrunePolicy()):
        seen: list[UsageInfo] = []
        would = cm.prune(policy, dry_run=True, on_removed=seen.append)
        assert seen == would
        assert cm.disk_usage() == before_du
        assert snapshot_names(client) == before_snapshots
        removed = cm.prune(policy)
        assert [(u.id, u.size) for u in removed] == [(u.id, u.size) for u in would]
        before_du = cm.disk_usage()
        before_snapshots = snapshot_names(client)
    assert cm.disk_usage() == []


def test_an_unknown_filter_field_removes_nothing(managers: Managers) -> None:
    cm = managers.open()
    ref = record_with(cm, 1000, None)
    ref.set_description("keep me")
    ref.release()
    with pytest.raises(InvalidError, match=r"unknown field 'descripton'.*description"):
        cm.prune(PrunePolicy(filters=["descripton!=x"]))
    with pytest.raises(InvalidError, match=r"unknown field 'labels\.x'"):
        cm.disk_usage(filters=["labels.x==y"])
    assert ids(cm.disk_usage()) == [ref.id]


def test_buildkit_and_buildx_filter_spellings(managers: Managers) -> None:
    cm = managers.open()
    parent = record_with(cm, 1000)
    child = record_with(cm, 1000, parent)
    parent_id = parent.id
    parent.release()
    child.release()
    assert ids(cm.disk_usage(filters=[f"parent=={parent_id}"])) == [child.id]
    assert ids(cm.disk_usage(filters=[f"parents=={parent_id}"])) == [child.id]
    with pytest.raises(InvalidError, match="only to a prune"):
        cm.disk_usage(filters=["until=1h"])
    # until=DURATION keeps records used within it.
    assert cm.prune(PrunePolicy(filters=["until=1h"])) == []
    time.sleep(0.3)
    removed = cm.prune(PrunePolicy(filters=["until=100ms", f"parent=={parent_id}"]))
    assert ids(removed) == [child.id]


def test_failed_gets_are_not_uses(managers: Managers) -> None:
    cm = managers.open()
    blob, desc = layer({"lazy": b"x"})
    dhs = {desc.digest: DescHandler(BytesProvider(blob))}
    ref = cm.get_by_blob(desc, desc_handlers=dhs)
    ref.release()
    before = cm.info(ref.id)
    for _ in range(3):
        with pytest.raises(NeedsRemoteProvidersError):
            cm.get(ref.id)
    after = cm.info(ref.id)
    assert after.usage_count == before.usage_count
    assert after.last_used_at == before.last_used_at


def test_a_parent_handle_and_a_linked_record_count_as_uses(managers: Managers) -> None:
    cm = managers.open()
    parent = record_with(cm, 1000)
    child = record_with(cm, 1000, parent)
    parent.release()
    count = cm.info(parent.id).usage_count
    handle = child.parent()
    assert handle is not None
    handle.release()
    child.release()
    assert cm.info(parent.id).usage_count == count + 1

    tar = make_tar({"shared": os.urandom(1000)})
    diff_id = digest_of(tar)
    blobs = {mt: compress(tar, mt) for mt in (TAR, TAR_GZIP)}
    descs = [
        Descriptor(mt, digest_of(b), len(b), {"containerd.io/uncompressed": diff_id})
        for mt, b in blobs.items()
    ]
    dhs = {d.digest: DescHandler(BytesProvider(*blobs.values())) for d in descs}
    first = cm.get_by_blob(descs[0], desc_handlers=dhs)
    first.extract()
    first.release()
    count = cm.info(first.id).usage_count
    # The second links the first's extracted snapshot: a use of the first, as in BuildKit.
    cm.get_by_blob(descs[1], desc_handlers=dhs).release()
    assert cm.info(first.id).usage_count == count + 1


def test_a_finalized_mutable_awaiting_removal_keeps_no_parent_in_use(
    managers: Managers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finalize leaves the mutable REMOVING, still holding its parent handle until the
    background remover takes it; that handle is no use of the parent (issue 18)."""
    cm = managers.open()
    base = cm.new().commit()
    base.finalize()
    work = cm.new(base)
    snap = work.commit()
    base.release()
    # The removal is held back, so that the REMOVING state lasts.
    pending: list[_Record] = []
    remove_later = cm._core.remove_later
    monkeypatch.setattr(cm._core, "remove_later", pending.append)
    snap.finalize()
    snap.release()
    assert [r.id for r in pending] == [work.id]
    usage = {u.id: u for u in cm.disk_usage()}
    assert work.id not in usage
    assert not usage[base.id].in_use

    remove_later(pending.pop())
    cm._wait_background()
    usage = {u.id: u for u in cm.disk_usage()}
    assert (sorted(usage), usage[base.id].in_use) == (sorted([base.id, snap.id]), False)
    cm.close()


def test_cli_prune_dry_run(daemon: Daemon, namespace: str, managers: Managers) -> None:
    cm = managers.open(managers.state_dir)
    ref = record_with(cm, MiB)
    ref_id = ref.id
    ref.release()
    cm.close()
    cli = Cli(daemon, namespace, managers.state_dir)
    document = cli.json("prune", "--dry-run")
    assert [r["id"] for r in document["removed"]] == [ref_id]
    assert document["dry_run"] is True
    assert document["total"] >= MiB
    lines = cli.ok("prune", "--dry-run").splitlines()
    assert lines[-1].startswith("Would free:")
    assert [r["id"] for r in cli.json("du")["records"]] == [ref_id]
    one_line_error(cli("prune", "--filter", "descripton!=x"), "unknown field 'descripton'")
    assert [r["id"] for r in cli.json("du")["records"]] == [ref_id]
    assert [r["id"] for r in cli.json("prune", "--filter", "until=1ms")["removed"]] == [ref_id]


def test_sizes_measured_by_disk_usage_are_stored(managers: Managers) -> None:
    """disk_usage writes what it measured to the rows in one transaction (issue 19): a
    reopened manager reports the same sizes without measuring, and a record written after the
    measurement is measured again."""
    cm = managers.open()
    snaps = [record_with(cm, MiB) for _ in range(3)]
    work = cm.new(cache_policy=CachePolicy.RETAIN)
    work.release()
    for snap in snaps:
        snap.release()
    measured = sizes(cm)
    assert all(measured[s.id] >= MiB for s in snaps)
    cm.close()

    again = managers.open()
    assert {s.id: again.info(s.id).size for s in snaps} == {s.id: measured[s.id] for s in snaps}
    assert again.info(work.id).size == measured[work.id]
    changed = again.get_mutable(work.id)
    changed.apply(make_tar({"two": os.urandom(2 * MiB)}))
    changed.release()
    assert again.info(work.id).size is None
    assert sizes(again)[work.id] >= 2 * MiB
