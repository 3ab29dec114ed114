"""Several processes on one state directory (issue 20): each test drives managers in real
processes of their own (`tests.mp_peer`, started with `spawn`) beside the test's own, on a
real containerd. Processes are sequenced through their pipes, never by sleeping."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from pyctrd_cache import (
    CachePolicy,
    Compression,
    LockedError,
    Manager,
    NeedsRemoteProvidersError,
    PrunePolicy,
)
from pyctrd_cache.cache import converter
from pyctrd_cache.client import Client
from pyctrd_cache.metadata import DB_NAME, SCHEMA_VERSION
from pyctrd_cache.remote import DescHandler
from tests.checks import gc, owned_leases, snapshot_names
from tests.fix_containerd import SNAPSHOTTER, Daemon, Managers
from tests.layers import TAR, BytesProvider, layer
from tests.mp_peer import Peer, PeerError
from tests.reliability.invariants import check_all

ALL = PrunePolicy(all=True)
# The layer every process builds the same way (gzip with a fixed time: one digest).
PROVIDER_SNIPPET = (
    "blob, desc = layers.layer({'etc/shared': b'x' * 300_000})\n"
    "handlers = {desc.digest: DescHandler(layers.BytesProvider(blob))}"
)


@pytest.fixture
def peers(daemon: Daemon, managers: Managers) -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        if peer.process.is_alive():
            peer.close()


def _peer(daemon: Daemon, managers: Managers, peers: list[Peer]) -> Peer:
    peer = Peer(daemon.address, managers.namespace, managers.state_dir)
    peers.append(peer)
    return peer


def _usage(cm: Manager) -> dict[str, bool]:
    return {u.id: u.in_use for u in cm.disk_usage()}


def test_a_record_another_process_holds_is_never_pruned(
    daemon: Daemon, managers: Managers, peers: list[Peer], client: Client
) -> None:
    cm = managers.open()
    holder = _peer(daemon, managers, peers)
    held = holder.run(
        "m = cm.new(cache_policy=CachePolicy.RETAIN)\n"
        "refs['held'] = m.commit()\n"
        "refs['held'].finalize()\n"
        "c = cm.new(refs['held'], cache_policy=CachePolicy.RETAIN)\n"
        "refs['child'] = c.id\n"
        "c.release()\n"
        "result = refs['held'].id"
    )
    child = holder.run("result = refs['child']")
    usage = _usage(cm)
    assert usage[held] is True  # du here shows the other process's handle
    assert usage[child] is False
    removed = {u.id for u in cm.prune(ALL)}
    assert child in removed
    assert held not in removed
    assert _usage(cm) == {held: True}
    # Once released there, it goes here.
    holder.run("refs['held'].release()")
    assert {u.id for u in cm.prune(ALL)} == {held}
    # The holder forgets it: it was removed.
    with pytest.raises(PeerError) as err:
        holder.run(f"cm.get({held!r})")
    assert err.value.kind == "NotFoundError"
    holder.close()
    cm.close()
    gc(client)
    assert snapshot_names(client) == []


def test_two_writers_on_one_mutable(daemon: Daemon, managers: Managers, peers: list[Peer]) -> None:
    cm = managers.open()
    work = cm.new(cache_policy=CachePolicy.RETAIN)
    work.release()
    writer = _peer(daemon, managers, peers)
    writer.run(f"refs['w'] = cm.get_mutable({work.id!r})")
    with pytest.raises(LockedError):
        cm.get_mutable(work.id)
    with pytest.raises(LockedError):
        cm.get(work.id)  # a lazy commit would take it too
    # The other way round: the writer here, the peer refused.
    writer.run("refs['w'].release()")
    mine = cm.get_mutable(work.id)
    with pytest.raises(PeerError) as err:
        writer.run(f"cm.get_mutable({work.id!r})")
    assert err.value.kind == "LockedError"
    mine.release()


def test_two_pullers_of_one_lazy_blob(
    daemon: Daemon, managers: Managers, peers: list[Peer], client: Client
) -> None:
    _, desc = layer({"etc/shared": b"x" * 300_000})
    cm = managers.open()
    pullers = [_peer(daemon, managers, peers) for _ in range(2)]
    # Both get the blob at once (one record), then pull and extract it at once (one copy).
    for peer in pullers:
        peer.run(PROVIDER_SNIPPET)
    pull = (
        "ref = cm.get_by_blob(desc, desc_handlers=handlers, cache_policy=CachePolicy.RETAIN)\n"
        "ref.extract()\n"
        "result = ref.id, ref.is_lazy(), ref.info().snapshot_id\n"
        "ref.release()"
    )
    for peer in pullers:
        peer.send(pull)
    answers = [peer.answer() for peer in pullers]
    assert answers[0] == answers[1]
    record_id, lazy, snapshot = answers[0]
    assert lazy is False
    assert [c.digest for c in client.content.list() if c.digest == desc.digest] == [desc.digest]
    assert client.content.list_statuses() == []  # no ingest left half written
    assert snapshot_names(client) == [snapshot]
    # The blob is held by the record's lease: a collection keeps it.
    gc(client)
    client.content.info(desc.digest)
    assert [u.id for u in cm.disk_usage()] == [record_id]
    assert cm.get(record_id).is_lazy() is False


def test_two_converters_of_one_variant(
    daemon: Daemon, managers: Managers, peers: list[Peer], client: Client
) -> None:
    # Large enough that the two conversions overlap.
    blob, _ = layer({f"etc/converted{i}": os.urandom(1 << 20) for i in range(6)})
    cm = managers.open()
    work = cm.new(cache_policy=CachePolicy.RETAIN)
    work.apply(blob)
    snap = work.commit()
    snap.finalize()
    (gzip_desc,) = snap.get_remote().descriptors
    snap.release()
    converters = [_peer(daemon, managers, peers) for _ in range(2)]
    convert = (
        f"ref = cm.get({snap.id!r})\n"
        "(d,) = ref.get_remote(compression=Compression.ZSTD, force_compression=True).descriptors\n"
        "result = d.digest, d.media_type\n"
        "ref.release()"
    )
    for peer in converters:
        peer.send(convert)
    answers = [peer.answer() for peer in converters]
    assert answers[0] == answers[1]
    assert answers[0][1].endswith("zstd")
    zstd = [c.digest for c in client.content.list() if c.digest == answers[0][0]]
    assert zstd == [answers[0][0]]
    assert client.content.list_statuses() == []
    labels = client.content.info(gzip_desc.digest).labels
    assert [v for k, v in labels.items() if k.endswith("zstd")].count(answers[0][0]) >= 1


def test_two_converters_of_one_blob_in_two_records(
    daemon: Daemon, managers: Managers, peers: list[Peer], client: Client
) -> None:
    # One blob on two parents: two records, one conversion (one ingest) of the blob.
    blob, desc = layer({f"etc/converted{i}": os.urandom(1 << 20) for i in range(6)})
    lease = client.leases.create(f"test-{uuid.uuid4().hex}").id
    leased = client.with_lease(lease).content
    cm = managers.open()
    tops = []
    for name in ("a", "b"):
        parent_blob, parent_desc = layer({f"etc/{name}": name.encode()})
        for b, d in ((parent_blob, parent_desc), (blob, desc)):
            leased.write(f"w-{d.digest}", b, expected=d.digest, size=d.size)
        parent = cm.get_by_blob(parent_desc, cache_policy=CachePolicy.RETAIN)
        top = cm.get_by_blob(desc, parent, cache_policy=CachePolicy.RETAIN)
        parent.release()
        tops.append(top.id)
        top.release()
    client.leases.delete(lease)
    converters = [_peer(daemon, managers, peers) for _ in range(2)]
    for peer, top_id in zip(converters, tops, strict=True):
        peer.send(
            f"ref = cm.get({top_id!r})\n"
            "ds = ref.get_remote(compression=Compression.ZSTD, force_compression=True)\n"
            "result = ds.descriptors[-1].digest\n"
            "ref.release()"
        )
    answers = [peer.answer() for peer in converters]
    assert answers[0] == answers[1]
    assert client.content.list_statuses() == []


def test_a_conversion_waits_for_another_writer_of_its_ingest(
    managers: Managers, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob, _ = layer({"etc/converted": os.urandom(1 << 16)})
    cm = managers.open()
    work = cm.new(cache_policy=CachePolicy.RETAIN)
    work.apply(blob)
    snap = work.commit()
    snap.finalize()
    (gzip_desc,) = snap.get_remote().descriptors
    # A writer this process's locks do not order (a process of an older version) has the
    # conversion's ingest open; it ends while the conversion waits.
    other = client.content.writer(f"convert-{gzip_desc.digest}-zstd")
    waits: list[float] = []

    class Clock:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            waits.append(seconds)
            other.close()

    monkeypatch.setattr(converter, "time", Clock)
    (zstd,) = snap.get_remote(compression=Compression.ZSTD, force_compression=True).descriptors
    assert zstd.media_type.endswith("zstd")
    assert len(waits) == 1
    snap.release()


def test_a_blob_collected_before_its_record_holds_it_leaves_the_record_lazy(
    managers: Managers, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process's prune lets containerd collect the blob between get_by_blob's look
    # at the content store and the new record's lease.
    files = {"etc/collected": b"c" * 1000}
    blob, desc = layer(files)
    cm = managers.open()
    making = cm._new_blob_record

    def collected_first(*args: Any, **kwargs: Any) -> Any:
        client.leases.delete(lease)
        gc(client)
        return making(*args, **kwargs)

    monkeypatch.setattr(cm, "_new_blob_record", collected_first)
    lease = client.leases.create(f"test-{uuid.uuid4().hex}").id
    client.with_lease(lease).content.write("w", blob, expected=desc.digest, size=desc.size)
    handlers = {desc.digest: DescHandler(BytesProvider(blob))}
    with cm.get_by_blob(desc, desc_handlers=handlers) as ref:
        assert ref.is_lazy()
        ref.extract()
        with ref.mount() as root:
            assert (root / "etc/collected").read_bytes() == files["etc/collected"]
    # Without a handler the record cannot be had.
    other_blob, other = layer({"etc/other": b"o"})
    lease = client.leases.create(f"test-{uuid.uuid4().hex}").id
    leased = client.with_lease(lease).content
    leased.write("w", other_blob, expected=other.digest, size=other.size)
    with pytest.raises(NeedsRemoteProvidersError):
        cm.get_by_blob(other)


def test_a_record_found_by_blob_but_pruned_before_the_hold_is_made_again(
    daemon: Daemon,
    managers: Managers,
    peers: list[Peer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blob, desc = layer({"etc/again": b"a" * 1000})
    handlers = {desc.digest: DescHandler(BytesProvider(blob))}
    cm = managers.open()
    first = cm.get_by_blob(desc, desc_handlers=handlers)
    first_id = first.id
    first.release()
    pruner = _peer(daemon, managers, peers)
    getting = cm._get

    def pruned_meanwhile(record_id: str, **kwargs: Any) -> Any:
        ref = getting(record_id, **kwargs)
        if record_id == first_id and pruner.process.is_alive():
            assert pruner.run("result = [u.id for u in cm.prune(PrunePolicy(all=True))]") == [
                first_id
            ]
            pruner.close()
        return ref

    monkeypatch.setattr(cm, "_get", pruned_meanwhile)
    with cm.get_by_blob(desc, desc_handlers=handlers) as ref:
        assert ref.id != first_id
        assert ref.info().blob == desc.digest
    assert not pruner.process.is_alive()


def test_a_snapshot_shared_with_a_new_record_is_not_pruned_before_its_lease_holds_it(
    daemon: Daemon,
    managers: Managers,
    peers: list[Peer],
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two blobs of one diff (gzip and plain): the second's record shares the first's
    # snapshot; another process prunes meanwhile.
    files = {"etc/linked": b"l" * 1000}
    blob, desc = layer(files)
    plain_blob, plain = layer(files, TAR)
    handlers = {
        desc.digest: DescHandler(BytesProvider(blob)),
        plain.digest: DescHandler(BytesProvider(plain_blob)),
    }
    cm = managers.open()
    with cm.get_by_blob(desc, desc_handlers=handlers) as first:
        first.extract()
        first_id = first.id
    pruner = _peer(daemon, managers, peers)
    adding = cm._client.leases.add_resource

    def pruned_meanwhile(lease_id: str, resource: Any) -> None:
        if pruner.process.is_alive():
            pruner.run("cm.prune(PrunePolicy(all=True))")
            pruner.close()
            gc(client)
        adding(lease_id, resource)

    monkeypatch.setattr(cm._client.leases, "add_resource", pruned_meanwhile)
    with cm.get_by_blob(plain, desc_handlers=handlers) as second, cm.get(first_id) as first:
        assert second.info().snapshot_id == first.info().snapshot_id
        assert second.info().blob_only is False
        assert second.info().snapshot_id in snapshot_names(client)


def _open_fresh(
    barrier: Any, address: str, namespace: str, state_dir: str, snapshotter: str
) -> None:
    barrier.wait(60)
    Manager.open(address, namespace=namespace, snapshotter=snapshotter, state_dir=state_dir).close()


def test_four_processes_open_a_fresh_state_directory_at_once(
    daemon: Daemon, managers: Managers
) -> None:
    assert not managers.state_dir.exists()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    args = (barrier, daemon.address, managers.namespace, str(managers.state_dir), SNAPSHOTTER)
    openers = [ctx.Process(target=_open_fresh, args=args) for _ in range(4)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join(120)
    assert [o.exitcode for o in openers] == [0] * 4
    with sqlite3.connect(managers.state_dir / DB_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    managers.open()


def test_a_lazy_commit_made_in_one_process_is_finalized_in_another(
    daemon: Daemon, managers: Managers, peers: list[Peer], client: Client
) -> None:
    maker = _peer(daemon, managers, peers)
    ids = maker.run(
        "m = cm.new(cache_policy=CachePolicy.RETAIN)\n"
        "s = m.commit()\n"
        "s.set_cache_policy(CachePolicy.RETAIN)\n"
        "result = m.id, s.id\n"
        "s.release()"
    )
    mutable_id, snap_id = ids
    cm = managers.open()
    finishers = [_peer(daemon, managers, peers) for _ in range(2)]
    for peer in finishers:
        peer.send(f"r = cm.get({snap_id!r})\nr.finalize()\nr.release()")
    for peer in finishers:
        peer.answer()  # both finalize at once: one commits, the other finds it done
    with cm.get(snap_id) as ref:
        ref.finalize()
        assert ref.info().equal_mutable_id is None
        assert ref.info().snapshot_id == snap_id
    # The maker sees the finalize: the mutable is gone, the record is usable.
    assert maker.run(f"result = cm.info({snap_id!r}).equal_mutable_id") is None
    with pytest.raises(PeerError) as err:
        maker.run(f"cm.get_mutable({mutable_id!r})")
    assert err.value.kind == "NotFoundError"
    cm._wait_background()
    for peer in [maker, *finishers]:
        peer.run("cm._wait_background()")
    assert mutable_id not in snapshot_names(client)


def test_a_killed_holder_gives_up_its_holds(
    daemon: Daemon, managers: Managers, peers: list[Peer], client: Client
) -> None:
    cm = managers.open()
    holder = _peer(daemon, managers, peers)
    held = holder.run(
        "m = cm.new(cache_policy=CachePolicy.RETAIN)\n"
        "refs['held'] = m.commit()\n"
        "refs['held'].finalize()\n"
        "refs['held'].mounts(readonly=True)\n"  # a view lease of the holder's own
        "refs['lease'] = cm.lease()\n"
        "refs['lease'].__enter__()\n"  # a caller lease left open
        "result = refs['held'].id"
    )
    assert cm.prune(ALL) == []
    assert len(owned_leases(client, cm)) == 3
    holder.kill()
    # The next prune of anyone reaps the dead session: its holds, leases and file.
    assert [u.id for u in cm.prune(ALL)] == [held]
    assert owned_leases(client, cm) == []
    assert [p.name for p in (managers.state_dir / "sessions").iterdir()] == [cm._core.session]
    gc(client)
    assert snapshot_names(client) == []
    cm.close()


def test_a_store_of_the_single_process_schema_is_migrated(managers: Managers) -> None:
    cm = managers.open()
    kept = cm.new(cache_policy=CachePolicy.RETAIN)
    kept.release()
    cm.close()
    # Back to version 1, as the single-process versions wrote it.
    with sqlite3.connect(managers.state_dir / DB_NAME) as db:
        for trigger in ("records_inserted", "records_updated", "records_deleted"):
            db.execute(f"DROP TRIGGER {trigger}")
        for index in ("records_parent", "records_equal_mutable"):
            db.execute(f"DROP INDEX {index}")
        db.execute("DROP TABLE changes")
        db.execute("PRAGMA user_version = 1")
    cm = managers.open()
    with sqlite3.connect(managers.state_dir / DB_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    cm.get_mutable(kept.id).release()
    other = managers.open()
    with cm.get_mutable(kept.id) as again, pytest.raises(LockedError):
        other.get_mutable(again.id)


@pytest.mark.slow
def test_eight_processes_of_four_threads(
    daemon: Daemon, managers: Managers, peers: list[Peer], client: Client
) -> None:
    managers.open().close()  # the store exists before the crowd arrives
    workers = [_peer(daemon, managers, peers) for _ in range(8)]
    for index, peer in enumerate(workers):
        peer.send(WORKLOAD_SNIPPET.format(seed=f"{daemon.name}-{index}", seconds=SECONDS))
    outcomes = [peer.answer() for peer in workers]
    for peer in workers:
        peer.close()
    errors = [e for o in outcomes for e in o["errors"]]
    assert errors == [], "\n".join(errors)
    kept = {k: v for o in outcomes for k, v in o["kept"].items()}
    cm = managers.open()
    found = check_all(cm, client, daemon, kept)
    assert found.problems == []
    assert sum(o["steps"] for o in outcomes) > 8 * 4


SECONDS = 8
WORKLOAD_SNIPPET = """
import random, threading, time
from tests.reliability.workload import Workload
kept = {{}}
work = Workload(cm, kept.__setitem__)
deadline = time.monotonic() + {seconds}
errors = []
def worker(index):
    rng = random.Random(f"{seed}-{{index}}")
    try:
        while time.monotonic() < deadline:
            work.step(rng)
    except BaseException as err:
        import traceback
        errors.append(traceback.format_exc())
threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
result = {{"errors": errors, "kept": kept, "steps": work.steps}}
"""
