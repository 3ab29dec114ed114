"""Concurrency: 32 threads run the mixed workload on one manager, on overlapping chains
(they build on each other's kept records), then the invariants; and a second process
opening the same state directory shares it: its prune takes nothing the first holds."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time

from pyctrd_cache.client import Client
from tests.fix_containerd import ROOT, SNAPSHOTTER, Daemon, Managers
from tests.reliability import tally
from tests.reliability.invariants import check_all
from tests.reliability.workload import Workload

THREADS = 32
SECONDS = tally.scaled(ci=15, long=60)


def test_thirty_two_threads_on_overlapping_chains(
    daemon: Daemon, client: Client, managers: Managers
) -> None:
    cm = managers.open()
    kept: dict[str, str] = {}
    work = Workload(cm, kept.__setitem__)
    deadline = time.monotonic() + SECONDS
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        rng = random.Random(f"{daemon.name}-{index}")
        try:
            while time.monotonic() < deadline:
                work.step(rng)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cm.close()
    cm = managers.open()
    found = check_all(cm, client, daemon, kept)
    tally.add(
        "concurrency",
        runs=1,
        operations=work.steps,
        kept_records_checked=len(kept),
        errors=len(errors),
        records_lost=found.records_lost,
        leaks=found.leaks,
    )
    assert errors == []
    assert found.problems == []
    assert work.steps > THREADS


SECOND_CHILD = """
import sys
from pyctrd_cache import Manager, PrunePolicy
address, namespace, state_dir, snapshotter = sys.argv[1:5]
cm = Manager.open(address, namespace=namespace, state_dir=state_dir, snapshotter=snapshotter)
print("removed:", [u.id for u in cm.prune(PrunePolicy(all=True))])
print("usage:", [(u.id, u.in_use) for u in cm.disk_usage()])
cm.close()
"""


def test_a_second_process_shares_the_state_directory(daemon: Daemon, managers: Managers) -> None:
    cm = managers.open()
    with cm.new() as active:
        command = [
            sys.executable,
            "-c",
            SECOND_CHILD,
            daemon.address,
            managers.namespace,
            str(managers.state_dir),
            SNAPSHOTTER,
        ]
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
        # Its prune took nothing this process holds, and its usage shows it in use.
        assert out.stdout.splitlines() == ["removed: []", f"usage: [('{active.id}', True)]"]
        assert [(u.id, u.in_use) for u in cm.disk_usage()] == [(active.id, True)]
    tally.add("concurrency", second_opens_shared=1)
