"""Daemon crashes: containerd killed with SIGKILL, or stopped gracefully, while a child runs
the mixed workload, then started again. The child keeps its manager open throughout: calls
that can be repeated succeed by retry, the others fail with `UnavailableError` (the workload
tolerates only that class), and after reopening the invariants hold."""

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


@pytest.mark.parametrize("how", ["sigkill", "graceful"])
def test_daemon_goes_down_mid_workload(
    daemon: Daemon, namespace: str, client: Client, managers: Managers, how: str
) -> None:
    embedded = daemon.restartable()
    rng = random.Random(f"{how}-{daemon.name}")
    trials = Trials()
    unavailable = steps = 0
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
            if how == "sigkill":
                embedded.kill()
            else:
                embedded.stop()
            time.sleep(rng.uniform(0.1, 1.5))
            embedded.start()
            code = child.wait(120)
            if code != 0 or child.done is None:
                trials.problems.append(f"trial {trial}: workload exited {code}: {child.stderr()}")
                continue
        steps += child.done[0]
        unavailable += child.done[1]
        trials.check(trial, managers, client, daemon, child.kept)
    tally.add(
        f"daemon {how}",
        trials=ROUNDS,
        faults_survived=trials.survived,
        operations=steps,
        unavailable_errors=unavailable,
        records_lost=trials.records_lost,
        leaks=trials.leaks,
    )
    assert trials.problems == []
