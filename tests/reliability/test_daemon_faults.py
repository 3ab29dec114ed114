"""Daemon crashes: containerd killed with SIGKILL, or stopped gracefully, while a child runs
the mixed workload, then started again. The child keeps its manager open throughout: calls
that can be repeated succeed by retry, the others fail with `UnavailableError` (the workload
tolerates only that class), and after reopening the invariants hold. containerd stays down
until the child reports a call that failed for its absence, so every trial had a call in
flight during the outage. A kill that lands inside a snapshot create leaves a directory the
next create meets; the child's log line for each such create that was then repeated is
counted."""

from __future__ import annotations

import random
import time

import pytest

from pyctrd_cache.client import Client
from tests.fix_containerd import Daemon, Managers
from tests.reliability import tally
from tests.reliability.children import WorkloadChild
from tests.reliability.invariants import Trials

ROUNDS = tally.scaled(ci=3, long=20)
WORK_SECONDS = 4.0
# How long containerd stays down at most, waiting for the child to notice.
OUTAGE_TIMEOUT = 30.0
# What pyctrd_cache.client.snapshots logs when a create met a killed daemon's directory.
STRAY_DIRECTORY_LOG = "met a directory left by a killed containerd"


@pytest.mark.parametrize("how", ["sigkill", "graceful"])
def test_daemon_goes_down_mid_workload(
    daemon: Daemon, namespace: str, client: Client, managers: Managers, how: str
) -> None:
    embedded = daemon.restartable()
    rng = random.Random(f"{how}-{daemon.name}")
    trials = Trials()
    unavailable = steps = faults = strays = 0
    for trial in range(ROUNDS):
        with WorkloadChild(
            daemon,
            namespace,
            str(managers.state_dir),
            rng.randrange(1 << 30),
            WORK_SECONDS,
            tolerate_unavailable=True,
        ) as child:
            child.wait_ready()
            time.sleep(rng.uniform(0.5, 2.5))
            before = child.faults
            if how == "sigkill":
                embedded.kill()
            else:
                embedded.stop()
            noticed = child.wait_fault(before, OUTAGE_TIMEOUT)
            time.sleep(rng.uniform(0.0, 1.0))
            embedded.start()
            code = child.wait(120)
            if code != 0 or child.done is None:
                trials.problems.append(
                    f"trial {trial}: workload exited {code}: {child.stderr()[-4000:]}"
                )
                continue
            if not noticed:
                trials.problems.append(f"trial {trial}: no call was in flight during the outage")
                continue
            strays += child.stderr().count(STRAY_DIRECTORY_LOG)
        steps += child.done[0]
        unavailable += child.done[1]
        faults += child.faults - before
        trials.check(trial, managers, client, daemon, child.kept)
    tally.add(
        f"daemon {how}",
        trials=ROUNDS,
        faults_survived=trials.survived,
        operations=steps,
        calls_failed_in_outage=faults,
        unavailable_errors=unavailable,
        stray_snapshot_directories_met=strays,
        records_lost=trials.records_lost,
        leaks=trials.leaks,
    )
    assert trials.problems == []
