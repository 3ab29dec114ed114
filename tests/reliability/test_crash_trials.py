"""Client crashes: a child runs the mixed workload and is killed with SIGKILL at a random
moment; the parent reopens the manager and checks the invariants (invariants.py). A trial
counts only if the child was alive and died of the SIGKILL, and the run must have kept
records for the invariants to check."""

from __future__ import annotations

import os
import random
import time

from pyctrd_cache.client import Client
from tests.fix_containerd import Daemon, Managers
from tests.reliability import tally
from tests.reliability.children import WorkloadChild
from tests.reliability.invariants import Trials

TRIALS = tally.scaled(ci=30, long=200)
SEED = int(os.environ.get("PYCTRD_RELIABILITY_SEED", "6"))


def test_sigkill_at_random_moments(
    daemon: Daemon, namespace: str, client: Client, managers: Managers
) -> None:
    rng = random.Random(SEED)
    trials = Trials()
    kept = 0
    for trial in range(TRIALS):
        with WorkloadChild(
            daemon, namespace, str(managers.state_dir), rng.randrange(1 << 30), 600
        ) as child:
            child.wait_ready()
            time.sleep(rng.uniform(0.0, 2.5))
            child.kill()
        trials.check(trial, managers, client, daemon, child.kept)
        kept += len(child.kept)
    tally.add(
        "crash trials",
        trials=TRIALS,
        faults_survived=trials.survived,
        kept_records_checked=kept,
        records_lost=trials.records_lost,
        leaks=trials.leaks,
    )
    assert trials.problems == []
    assert kept > 0, "no trial kept a record: the invariants checked nothing"
