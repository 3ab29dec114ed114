"""Crash safety and thread safety of the cache core against real containerd daemons."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from pyctrd_cache import CachePolicy, ImmutableRef, Manager, NotFoundError, PrunePolicy
from pyctrd_cache.client import Client
from pyctrd_cache.manager import OWNER_LABEL
from tests.checks import run_killed_child
from tests.fix_containerd import SNAPSHOTTER, Daemon, Managers

# The child reaches each point once while it makes its anchor record, so the crash is
# armed for a later hit: the child layer's new, commit and finalize are the second; the third
# removal comes after both the anchor and the child layer exist (tests/crash_child.py).
CRASH_POINTS = [
    "new.after_lease:2",
    "new.after_prepare:2",
    "commit.after_insert:2",
    "finalize.after_lease:2",
    "finalize.after_snapshot_commit:2",
    "finalize.after_metadata:2",
    "remove.after_mark:3",
    "remove.after_lease_delete:3",
]


def owned_leases(client: Client, cm: Manager) -> set[str]:
    return {x.id for x in client.leases.list(f'labels."{OWNER_LABEL}"=={cm.manager_id}')}


def check_invariants(cm: Manager, client: Client) -> list[str]:
    """No lease without a record, every record mountable; returns the record ids."""
    usage = cm.disk_usage()
    ids = {u.id for u in usage}
    assert not any(u.in_use for u in usage), usage
    # Every lease of the manager belongs to a row (an unfinalized immutable hidden behind
    # its mutable twin in the usage report included).
    assert owned_leases(client, cm) <= {md.id for md in cm._store.all()}
    for record_id in sorted(ids):
        with cm.get(record_id, update_last_used=False) as ref, ref.mount() as target:
            assert target.is_dir()
    return sorted(ids)


def check_empty_after_prune(cm: Manager, client: Client) -> None:
    cm.prune(PrunePolicy(all=True))
    assert cm.disk_usage() == []
    assert owned_leases(client, cm) == set()
    assert client.snapshots(SNAPSHOTTER).list() == []
    assert client.content.list() == []


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_each_step_loses_nothing_and_leaks_nothing(
    daemon: Daemon, namespace: str, managers: Managers, client: Client, point: str
) -> None:
    env = dict(os.environ, PYCTRD_CRASH_POINT=point)
    out = run_killed_child("tests.crash_child", daemon, managers, env)
    printed = dict(line.split(" ", 1) for line in out.splitlines())
    assert "done" not in printed

    cm = managers.open()
    ids = check_invariants(cm, client)
    # The retained, finalized anchor is never lost.
    with cm.get(printed["anchor"]) as anchor, anchor.mount() as target:
        assert (target / "anchor").read_text() == "anchor"
    assert printed["anchor"] in ids
    # Whatever of the child layer survived still holds what was written.
    if (
        "immutable" in printed
        and point != "remove.after_mark"
        and point != "remove.after_lease_delete"
    ):
        try:
            ref = cm.get(printed["immutable"])
        except NotFoundError:
            ref = cm.get(printed["mutable"])
        with ref, ref.mount() as target:
            assert (target / "child").read_text() == "child"
    if "doomed" in printed:
        with pytest.raises(NotFoundError):
            cm.get_mutable(printed["doomed"])
    check_empty_after_prune(cm, client)


def test_sixteen_threads_on_shared_parents(managers: Managers, client: Client) -> None:
    cm = managers.open()
    seconds = float(os.environ.get("PYCTRD_STRESS_SECONDS", "20"))
    parents: list[ImmutableRef] = []
    for _ in range(3):
        base = cm.new(cache_policy=CachePolicy.RETAIN).commit()
        base.finalize()
        parents.append(base)
    deadline = time.monotonic() + seconds
    errors: list[BaseException] = []
    counts = [0] * 16

    def worker(index: int) -> None:
        rng = random.Random(index)
        mine: list[str] = []
        try:
            while time.monotonic() < deadline:
                parent = rng.choice([None, *parents])
                policy = rng.choice(list(CachePolicy))
                active = cm.new(parent, cache_policy=policy)
                snap = active.commit()
                if rng.random() < 0.5:
                    snap.finalize()
                again = cm.get(snap.id)
                clone = again.clone()
                if rng.random() < 0.3:
                    with clone.parent() or again.clone() as p:
                        p.size()
                snap.release()
                again.release()
                clone.release()
                if policy is CachePolicy.RETAIN and rng.random() < 0.5:
                    mine.append(snap.id)
                if mine and rng.random() < 0.2:
                    with cm.get(rng.choice(mine)) as ref:
                        ref.mounts(readonly=True)
                if rng.random() < 0.05:
                    cm.disk_usage()
                counts[index] += 1
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(counts) > 16
    for p in parents:
        p.release()
    check_invariants(cm, client)
    cm.close()
    cm = managers.open()
    check_invariants(cm, client)
    check_empty_after_prune(cm, client)
    print(f"thread test: {sum(counts)} cycles in {seconds:g}s")
