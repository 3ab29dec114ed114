"""Results of record and manager calls that other tests use without checking: creation
times, the record listing, cached sizes, caller leases that expire, the collector links of
compression variants, and prunes by several policies or bounded by size."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from pyctrd_cache import (
    CachePolicy,
    Compression,
    InvalidError,
    Manager,
    PrunePolicy,
)
from pyctrd_cache.blobs import VARIANT_GC_REF_PREFIX
from pyctrd_cache.client import Client, LeaseResource
from pyctrd_cache.client.leases import EXPIRE_LABEL
from tests.checks import blob_count, gc
from tests.fix_containerd import Daemon, Managers
from tests.layers import digest_of, make_tar

MiB = 1 << 20


def record(cm: Manager, size: int = 1000, description: str = "") -> str:
    """A retained, finalized record holding `size` random bytes, released; its id."""
    work = cm.new(cache_policy=CachePolicy.RETAIN, description=description)
    work.apply(make_tar({"data": os.urandom(size)}))
    with work.commit() as snap:
        snap.finalize()
        return snap.id


def ids_oldest_first(cm: Manager) -> list[str]:
    return [status.info.id for status in cm.records()]


def test_set_created_at_persists_and_orders_the_records(managers: Managers) -> None:
    cm = managers.open()
    first, second = record(cm), record(cm)
    assert ids_oldest_first(cm) == [first, second]
    early = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    with cm.get(second) as ref:
        ref.set_created_at(early)
        with pytest.raises(InvalidError, match="timezone"):
            ref.set_created_at(datetime(2020, 1, 1))
        assert ref.info().created_at == early
    assert ids_oldest_first(cm) == [second, first]
    cm.close()

    cm = managers.open()
    assert cm.info(second).created_at == early
    assert ids_oldest_first(cm) == [second, first]
    late = datetime(2030, 6, 7, 8, 9, 10, 123456, tzinfo=UTC)
    with cm.get(second) as ref:
        ref.set_created_at(late)
    assert cm.info(second).created_at == late
    assert ids_oldest_first(cm) == [first, second]


def test_records_lists_use_without_measuring(managers: Managers) -> None:
    cm = managers.open()
    base = record(cm, description="base")
    idle = record(cm, description="idle")
    parent = cm.get(base)
    work = cm.new(parent, cache_policy=CachePolicy.RETAIN, description="work")
    parent.release()

    statuses = cm.records()
    assert [(s.info.id, s.info.description, s.in_use) for s in statuses] == [
        (base, "base", True),  # a record built on it is open
        (idle, "idle", False),
        (work.id, "work", True),
    ]
    assert [s.info.size for s in statuses] == [None, None, None]
    assert statuses[2].info.mutable
    assert statuses[2].info.parent_id == base

    work.release()
    assert [(s.info.id, s.in_use) for s in cm.records()] == [
        (base, False),
        (idle, False),
        (work.id, False),
    ]
    # A usage report measures; the listing then shows the sizes it measured.
    sizes = {u.id: u.size for u in cm.disk_usage()}
    assert {s.info.id: s.info.size for s in cm.records()} == sizes


def test_size_is_measured_once_and_kept(daemon: Daemon, managers: Managers) -> None:
    embedded = daemon.restartable()
    cm = managers.open()
    record_id = record(cm, MiB)
    assert cm.info(record_id).size is None
    with cm.get(record_id) as ref:
        size = ref.size()
        assert size >= MiB
        assert cm.info(record_id).size == size
        # Asked again with containerd down: the kept figure, no call to containerd.
        embedded.stop()
        try:
            assert ref.size() == size
        finally:
            embedded.start()
    cm.close()
    cm = managers.open()
    assert cm.info(record_id).size == size


def _write_under(client: Client, lease_id: str, data: bytes) -> str:
    digest = digest_of(data)
    client.with_lease(lease_id).content.write(
        f"ref-{uuid.uuid4().hex}", data, expected=digest, size=len(data)
    )
    return digest


def test_a_caller_lease_with_expire_is_dropped_by_the_collector(
    managers: Managers, client: Client
) -> None:
    cm = managers.open()
    expire = timedelta(seconds=1)
    with cm.lease() as kept_id, cm.lease(expire=expire) as lease_id:
        before = datetime.now(UTC)
        (lease,) = [x for x in client.leases.list() if x.id == lease_id]
        until = datetime.fromisoformat(lease.labels[EXPIRE_LABEL])
        assert before - timedelta(seconds=5) <= until - expire <= before
        assert EXPIRE_LABEL not in next(x for x in client.leases.list() if x.id == kept_id).labels
        kept = _write_under(client, kept_id, b"held by the lease without expiry")
        dropped = _write_under(client, lease_id, b"held by the lease that expires")
        while datetime.now(UTC) <= until:
            time.sleep(until.timestamp() - time.time() + 0.1)
        gc(client)
        assert lease_id not in {x.id for x in client.leases.list()}
        assert {i.digest for i in client.content.list()} == {kept}
        assert dropped != kept
    gc(client)
    assert blob_count(client) == 0


def test_a_variant_is_kept_by_whoever_holds_the_original_blob(
    managers: Managers, client: Client
) -> None:
    cm = managers.open()
    work = cm.new()
    with work.mount(readonly=False) as root:
        (root / "v").write_bytes(os.urandom(100_000))
    with work.commit() as snap:
        (original,) = snap.get_remote(compression=Compression.GZIP).descriptors
        (zstd,) = snap.get_remote(compression=Compression.ZSTD, force_compression=True).descriptors
        (plain,) = snap.get_remote(
            compression=Compression.UNCOMPRESSED, force_compression=True
        ).descriptors
    labels = client.content.info(original.digest).labels
    links = {k: v for k, v in labels.items() if k.startswith(VARIANT_GC_REF_PREFIX)}
    # The original is no variant of itself.
    assert links == {
        VARIANT_GC_REF_PREFIX + "zstd": zstd.digest,
        VARIANT_GC_REF_PREFIX + "uncompressed": plain.digest,
    }

    # A lease of someone else's that holds only the original blob keeps the variants once
    # the record is gone.
    holder = client.leases.create(f"holder-{uuid.uuid4().hex}")
    client.leases.add_resource(holder.id, LeaseResource.content(original.digest))
    cm.prune(PrunePolicy(all=True))
    assert cm.disk_usage() == []
    gc(client)
    assert {i.digest for i in client.content.list()} == {original.digest, zstd.digest, plain.digest}
    client.leases.delete(holder.id, sync=True)
    assert blob_count(client) == 0


def test_prune_applies_each_policy_in_turn(managers: Managers) -> None:
    cm = managers.open()
    alpha, beta, gamma = (record(cm, description=d) for d in ("alpha", "beta", "gamma"))
    reported: list[str] = []
    removed = cm.prune(
        PrunePolicy(filters=["description==alpha"]),
        PrunePolicy(filters=["description==beta"]),
        on_removed=lambda info: reported.append(info.id),
    )
    assert [u.id for u in removed] == reported == [alpha, beta]
    assert [u.id for u in cm.disk_usage()] == [gamma]
    delta = record(cm, description="delta")
    removed = cm.prune(PrunePolicy(filters=["description==gamma"]), PrunePolicy(keep_bytes=1))
    assert [u.id for u in removed] == [gamma, delta]
    assert cm.disk_usage() == []


def test_keep_bytes_ranks_by_usage_count_as_well_as_last_use(managers: Managers) -> None:
    cm = managers.open()
    a, b, c = (record(cm, MiB) for _ in range(3))
    # b is the least recently used but the most used: a goes before it.
    for _ in range(4):
        cm.get(b).release()
    cm.get(a).release()
    cm.get(c).release()
    counts = {u.id: u.usage_count for u in cm.disk_usage()}
    assert counts[b] > counts[a] == counts[c]
    last_used = {s.info.id: s.info.last_used_at for s in cm.records()}
    assert last_used[b] < last_used[a] < last_used[c]  # type: ignore[operator]
    sizes = {u.id: u.size for u in cm.disk_usage()}
    removed = cm.prune(PrunePolicy(keep_bytes=sum(sizes.values()) - 1))
    assert [u.id for u in removed] == [a]
    removed = cm.prune(PrunePolicy(keep_bytes=sizes[c]))
    assert [u.id for u in removed] == [b]
    assert [u.id for u in cm.disk_usage()] == [c]
