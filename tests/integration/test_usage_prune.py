"""Disk usage and the prune policies against real containerd daemons."""

from __future__ import annotations

import json
import os
import threading
import uuid
from datetime import timedelta

import pytest

from pyctrd_cache import (
    CachePolicy,
    DescHandler,
    Descriptor,
    ImmutableRef,
    InvalidError,
    Manager,
    PrunePolicy,
    RecordType,
    UsageInfo,
)
from pyctrd_cache.client import Client
from pyctrd_cache.metadata import DB_NAME
from tests.checks import back_date, blob_count, owned_leases, snapshot_names
from tests.fix_containerd import SNAPSHOTTER, Managers
from tests.layers import (
    TAR,
    TAR_GZIP,
    TAR_ZSTD,
    BytesProvider,
    compress,
    digest_of,
    layer,
    make_tar,
)

MiB = 1 << 20
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def record_with(cm: Manager, size: int, **kwargs: object) -> ImmutableRef:
    """A finalized record holding one file of `size` random bytes."""
    work = cm.new(**kwargs)  # type: ignore[arg-type]
    work.apply(make_tar({"data": os.urandom(size)}))
    snap = work.commit()
    snap.finalize()
    return snap


def ids(infos: list[UsageInfo]) -> set[str]:
    return {i.id for i in infos}


def test_keep_bytes_removes_least_recently_used_first(managers: Managers) -> None:
    cm = managers.open()
    refs = [record_with(cm, MiB) for _ in range(4)]
    for ref in refs:
        ref.release()
    # Use the first two again, so the last two are the least recently used.
    for ref in refs[:2]:
        cm.get(ref.id).release()
    usage = {u.id: u.size for u in cm.disk_usage()}
    assert all(size >= MiB for size in usage.values())
    keep = usage[refs[0].id] + usage[refs[1].id] + 1000
    removed = cm.prune(PrunePolicy(keep_bytes=keep))
    assert ids(removed) == {refs[2].id, refs[3].id}
    assert sum(u.size for u in cm.disk_usage()) <= keep
    assert cm.prune(PrunePolicy(keep_bytes=keep)) == []


def test_keep_duration_keeps_recently_used(managers: Managers) -> None:
    cm = managers.open()
    old = record_with(cm, 1000, cache_policy=CachePolicy.RETAIN)
    old.release()
    cm.close()
    # Last used two hours ago: an hour's margin either side of the durations asked below.
    back_date(managers.state_dir, old.id, timedelta(hours=2))
    cm = managers.open()
    recent = record_with(cm, 1000)
    recent.release()
    assert cm.prune(PrunePolicy(keep_duration=timedelta(hours=3))) == []
    removed = cm.prune(PrunePolicy(keep_duration=timedelta(hours=1)))
    assert ids(removed) == {old.id}
    assert ids(cm.disk_usage()) == {recent.id}


def test_filters_and_all(managers: Managers) -> None:
    cm = managers.open()
    a = record_with(cm, 1000, description="alpha")
    b = record_with(cm, 1000, description="beta")
    internal = record_with(cm, 1000, record_type=RecordType.INTERNAL)
    frontend = record_with(cm, 1000, record_type=RecordType.FRONTEND)
    mutable = cm.new(cache_policy=CachePolicy.RETAIN, description="work")
    for ref in (a, b, internal, frontend):
        ref.release()
    mutable.release()

    assert ids(cm.disk_usage(filters=["description==alpha"])) == {a.id}
    assert ids(cm.disk_usage(filters=["description~=^(alpha|beta)$"])) == {a.id, b.id}
    assert ids(cm.disk_usage(filters=["mutable"])) == {mutable.id}
    assert ids(cm.disk_usage(filters=["type==internal", "type==frontend"])) == {
        internal.id,
        frontend.id,
    }
    assert ids(cm.disk_usage(filters=["immutable,description!=alpha"])) == {
        b.id,
        internal.id,
        frontend.id,
    }
    with pytest.raises(InvalidError, match="position"):
        cm.disk_usage(filters=["description==alpha,,"])
    with pytest.raises(InvalidError, match="position"):
        cm.prune(PrunePolicy(filters=["id<3"]))

    assert ids(cm.prune(PrunePolicy(filters=["description==beta"]))) == {b.id}
    # Without `all`, internal and frontend records stay; a retained mutable does not.
    assert ids(cm.prune()) == {a.id, mutable.id}
    assert ids(cm.prune(PrunePolicy(all=True))) == {internal.id, frontend.id}
    assert cm.disk_usage() == []


def _image_of(client: Client, layers: list[Descriptor]) -> str:
    """Registers an image whose manifest lists `layers` in containerd's image store."""
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [d.to_oci() for d in layers],
        }
    ).encode()
    lease = client.leases.create(f"img-{uuid.uuid4().hex}")
    leased = client.with_lease(lease.id)
    for blob in (config, manifest):
        leased.content.write(
            f"img-{digest_of(blob)}", blob, expected=digest_of(blob), size=len(blob)
        )
    name = f"test.invalid/shared:{uuid.uuid4().hex[:8]}"
    client.images.create(
        name,
        Descriptor(
            "application/vnd.oci.image.manifest.v1+json", digest_of(manifest), len(manifest)
        ),
    )
    client.leases.delete(lease.id)
    return name


def test_records_an_image_uses_are_shared_and_kept(managers: Managers, client: Client) -> None:
    cm = managers.open()
    b1, d1 = layer({"one": b"1"})
    b2, d2 = layer({"two": b"2"})
    provider = BytesProvider(b1, b2)
    dhs = {d.digest: DescHandler(provider) for d in (d1, d2)}
    base = cm.get_by_blob(d1, desc_handlers=dhs)
    top = cm.get_by_blob(d2, base, desc_handlers=dhs)
    other = record_with(cm, 1000)
    name = _image_of(client, [d1, d2])
    for ref in (base, top, other):
        ref.release()

    shared = {u.id: u.shared for u in cm.disk_usage()}
    assert shared == {base.id: True, top.id: True, other.id: False}
    assert ids(cm.disk_usage(filters=["shared"])) == {base.id, top.id}
    assert ids(cm.disk_usage(filters=["private"])) == {other.id}
    assert ids(cm.prune()) == {other.id}
    assert ids(cm.prune(PrunePolicy(all=True))) == {base.id, top.id}

    client.images.delete(name, sync=True)
    # A checker given to open replaces the image store's.
    cm.close()
    cm = Manager.open(
        client.address,
        namespace=client.namespace,
        snapshotter=SNAPSHOTTER,
        state_dir=managers.state_dir,
        shared_checker=lambda: _Everything(),
    )
    try:
        kept = record_with(cm, 1000)
        kept.release()
        assert [u.shared for u in cm.disk_usage()] == [True]
        assert cm.prune() == []
    finally:
        cm.prune(PrunePolicy(all=True))
        cm.close()


class _Everything:
    def exists(self, record_id: str, blobs: object) -> bool:
        return True


def test_free_space_policy(managers: Managers) -> None:
    cm = managers.open()
    refs = [record_with(cm, MiB) for _ in range(3)]
    for ref in refs:
        ref.release()
    total = sum(u.size for u in cm.disk_usage())
    one = max(u.size for u in cm.disk_usage())
    # Room to spare on the disk: min_free_space alone removes nothing.
    assert cm.prune(PrunePolicy(min_free_space=1)) == []
    # max_used_space caps the cache like keep_bytes: the least recently used goes.
    removed = cm.prune(PrunePolicy(max_used_space=total - one))
    assert ids(removed) == {refs[0].id}
    # A file system that can never have enough free space: everything above the reserve goes.
    removed = cm.prune(PrunePolicy(min_free_space=1 << 62, reserved_space=one))
    assert ids(removed) == {refs[1].id}
    assert ids(cm.disk_usage()) == {refs[2].id}


def test_a_shared_snapshot_counts_once_and_is_not_hidden(
    managers: Managers, client: Client
) -> None:
    """moby/buildkit#6931: records with one chain id share a snapshot; its size counts once,
    and still counts when the record that extracted it is gone."""
    cm = managers.open()
    tar = make_tar({"big": os.urandom(2 * MiB)})
    diff_id = digest_of(tar)
    blobs = {mt: compress(tar, mt) for mt in (TAR_GZIP, TAR, TAR_ZSTD)}
    descs = {
        mt: Descriptor(mt, digest_of(b), len(b), {"containerd.io/uncompressed": diff_id})
        for mt, b in blobs.items()
    }
    provider = BytesProvider(*blobs.values())
    dhs = {d.digest: DescHandler(provider) for d in descs.values()}
    lazy = cm.get_by_blob(descs[TAR_GZIP], desc_handlers=dhs)
    extracted = cm.get_by_blob(descs[TAR], desc_handlers=dhs)
    assert extracted.info().snapshot_id == lazy.info().snapshot_id
    extracted.extract()
    linked = cm.get_by_blob(descs[TAR_ZSTD], desc_handlers=dhs)  # links an extracted snapshot
    assert not linked.info().blob_only
    snapshot_id = lazy.info().snapshot_id
    for ref in (lazy, extracted, linked):
        ref.release()

    usage = client.snapshots(SNAPSHOTTER).usage(snapshot_id).size
    assert usage >= 2 * MiB
    blob_bytes = len(blobs[TAR])  # the only blob pulled: the one extracted
    du = {u.id: u.size for u in cm.disk_usage()}
    assert sum(du.values()) == usage + blob_bytes

    cm.prune(PrunePolicy(filters=[f"id=={extracted.id}", f"id=={linked.id}"]))
    du = {u.id: u.size for u in cm.disk_usage()}
    assert list(du) == [lazy.id]
    assert snapshot_names(client) == [snapshot_id]
    assert du[lazy.id] >= usage  # the snapshot that remains is not hidden
    cm.prune(PrunePolicy(all=True))
    assert blob_count(client) == 0


def test_metadata_store_size_is_reported(managers: Managers) -> None:
    cm = managers.open()
    record_with(cm, 10).release()
    db = managers.state_dir / DB_NAME
    files = [db, db.with_name(DB_NAME + "-wal"), db.with_name(DB_NAME + "-shm")]
    assert files[1].stat().st_size > 0  # written, not yet checkpointed
    assert cm.metadata_size() == sum(f.stat().st_size for f in files)


def test_gets_go_on_while_a_thousand_records_are_pruned(managers: Managers, client: Client) -> None:
    """moby/buildkit#4401: prune does not hold the manager lock for long. At checkpoints
    through the prune, it waits until a `get` started after the checkpoint has returned, so
    gets must complete in the middle of the prune. (Latency figures: bench/run.py.)"""
    cm = managers.open()
    keep = record_with(cm, 10)
    keep_id = keep.id
    keep.set_record_type(RecordType.INTERNAL)  # not pruned without `all`
    keep.release()
    for _ in range(1000):
        cm.new(cache_policy=CachePolicy.RETAIN).release()
    gets = 0
    progress = threading.Condition()
    done = threading.Event()

    def probe() -> None:
        nonlocal gets
        while not done.is_set():
            cm.get(keep_id, update_last_used=False).release()
            with progress:
                gets += 1
                progress.notify_all()

    checkpoints = {1, 250, 500, 750, 1000}
    removals = 0
    missed: list[int] = []

    def on_removed(_: UsageInfo) -> None:
        nonlocal removals
        removals += 1
        if removals in checkpoints:
            with progress:
                # Two more: the first may have started before the checkpoint.
                seen = gets
                if not progress.wait_for(lambda: gets >= seen + 2, timeout=30):
                    missed.append(removals)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        removed = cm.prune(on_removed=on_removed)
    finally:
        done.set()
        prober.join()
    assert len(removed) == 1000
    assert missed == [], f"no get completed at removals {missed} of the prune"
    assert owned_leases(client, cm) == [keep_id]


def test_prune_collects_what_a_dropped_lease_held(managers: Managers, client: Client) -> None:
    # Nothing is left for the prune to remove, but a lease went since the last collection.
    cm = managers.open()
    data = b"held only by the caller's lease"
    with cm.lease() as lease_id:
        client.with_lease(lease_id).content.write(
            f"ref-{uuid.uuid4().hex}", data, expected=digest_of(data), size=len(data)
        )
    assert blob_count(client) == 1
    assert cm.prune(PrunePolicy(all=True)) == []
    assert blob_count(client) == 0
