"""Several processes on one state directory (issue 20): each runs the mixed workload of
multiproc.py, which crosses from one process's records to another's, through its own
`Manager.open` of the same state directory.

- Crash trials: two to four processes at once, one of them (chosen at random) SIGKILLed at a
  random moment; the others run their time out and must end without an error. A trial
  counts only if the chosen child was alive and died of the SIGKILL.
- Eight processes of four threads each, two of them mostly pruning and two holding records
  while the others prune, for a bounded time.

After each, a manager opened again checks every invariant of invariants.py (the kept records
of every process intact with their trees, nothing leaked after prune and collection), and no
mount is left under the state directory.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import time

from pyctrd_cache.client import Client
from tests.fix_containerd import Daemon, Managers
from tests.reliability import tally
from tests.reliability.children import WorkloadChild
from tests.reliability.invariants import Trials
from tests.reliability.multiproc import GO

TRIALS = tally.scaled(ci=10, long=80)
SECONDS = 4.0
SEED = int(os.environ.get("PYCTRD_RELIABILITY_SEED", "6"))
PROCESSES, THREADS = 8, 4
WORKLOAD_SECONDS = tally.scaled(ci=25, long=120)


def start(
    daemon: Daemon,
    managers: Managers,
    shared: pathlib.Path,
    seed: int,
    seconds: float,
    *,
    threads: int,
    role: str,
    pool_seed: int,
) -> WorkloadChild:
    return WorkloadChild(
        daemon,
        managers.namespace,
        str(managers.state_dir),
        seed,
        seconds,
        module="tests.reliability.multiproc",
        extra=[
            "--shared",
            str(shared),
            "--threads",
            str(threads),
            "--role",
            role,
            "--pool-seed",
            str(pool_seed),
        ],
    )


def finished(child: WorkloadChild, seconds: float) -> list[str]:
    """Waits for a child that runs its time out; what went wrong, if anything."""
    code = child.wait(seconds + 180)
    if code != 0 or child.done is None or child.done[1]:
        return [f"a surviving process failed ({code}, {child.done}): {child.stderr()[-4000:]}"]
    return []


def mounts_under(path: pathlib.Path) -> list[str]:
    prefix = os.fsencode(path) + b"/"
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    return [os.fsdecode(p) for p in points if p.startswith(prefix)]


def test_sigkill_one_of_several_processes(
    daemon: Daemon, client: Client, managers: Managers, tmp_path: pathlib.Path
) -> None:
    rng = random.Random(SEED)
    trials = Trials()
    kept_total = 0
    for trial in range(TRIALS):
        shared = tmp_path / f"trial-{trial}"
        shared.mkdir()
        count = rng.randint(2, 4)
        victim = rng.randrange(count)
        pool_seed = rng.randrange(1 << 30)
        problems: list[str] = []
        killed = False
        with contextlib.ExitStack() as stack:
            children = [
                stack.enter_context(
                    start(
                        daemon,
                        managers,
                        shared,
                        rng.randrange(1 << 30),
                        600 if i == victim else SECONDS,
                        threads=2,
                        role=rng.choice(["mixed", "mixed", "pruner", "holder"]),
                        pool_seed=pool_seed,
                    )
                )
                for i in range(count)
            ]
            try:
                for child in children:
                    child.wait_ready(120)
            except AssertionError as err:
                # Not a trial (the rest are SIGKILLed on the way out), but a failure, and
                # the directory must still pass the checks.
                problems.append(f"a process did not start: {err}")
            else:
                (shared / GO).touch()
                time.sleep(rng.uniform(0.0, SECONDS))
                children[victim].kill()
                for i, child in enumerate(children):
                    if i != victim:
                        problems += finished(child, SECONDS)
                killed = True
        kept: dict[str, str] = {}
        for child in children:
            kept.update(child.kept)
        survived, lost, leaks = trials.survived, trials.records_lost, trials.leaks
        trials.check(trial, managers, client, daemon, kept)
        problems += [f"mount left: {m}" for m in mounts_under(managers.state_dir)]
        trials.problems += [f"trial {trial}: {p}" for p in problems]
        tally.add(
            "multi-process crash trials",
            trials=int(killed),
            processes=count,
            faults_survived=(trials.survived - survived) * killed,
            kept_records_checked=len(kept),
            records_lost=trials.records_lost - lost,
            leaks=trials.leaks - leaks,
            process_errors=len(problems),
        )
        kept_total += len(kept)
    assert trials.problems == [], "\n".join(trials.problems)
    assert kept_total > 0, "no trial kept a record: the invariants checked nothing"


def test_eight_processes_of_four_threads(
    daemon: Daemon, client: Client, managers: Managers, tmp_path: pathlib.Path
) -> None:
    roles = ["pruner"] * 2 + ["holder"] * 2 + ["mixed"] * (PROCESSES - 4)
    shared = tmp_path / "shared"
    shared.mkdir()
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        children = [
            stack.enter_context(
                start(
                    daemon,
                    managers,
                    shared,
                    i,
                    WORKLOAD_SECONDS,
                    threads=THREADS,
                    role=role,
                    pool_seed=SEED,
                )
            )
            for i, role in enumerate(roles)
        ]
        for child in children:
            child.wait_ready(180)
        (shared / GO).touch()
        for child in children:
            problems += finished(child, WORKLOAD_SECONDS)
    kept: dict[str, str] = {}
    for child in children:
        kept.update(child.kept)
    trials = Trials()
    trials.check(0, managers, client, daemon, kept)
    problems += trials.problems
    problems += [f"mount left: {m}" for m in mounts_under(managers.state_dir)]
    tally.add(
        "multi-process workload",
        runs=1,
        processes=PROCESSES,
        threads=PROCESSES * THREADS,
        operations=sum(c.done[0] for c in children if c.done is not None),
        kept_records_checked=len(kept),
        records_lost=trials.records_lost,
        leaks=trials.leaks,
        problems=len(problems),
    )
    assert problems == [], "\n".join(problems)
    assert kept, "no process kept a record: the invariants checked nothing"
