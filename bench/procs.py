"""Several processes on one state directory (issue 20), through the public API only: each
worker process (spawned) opens the same state directory with `Manager.open`.

- The new → commit → finalize → release cycle, the bare containerd calls it needs (made with
  the thin client, as bench_core's floor), and hot get/release of a record of the worker's
  own, with 1, 2 and 4 processes at once: each a total throughput, and its ratio to the
  single-process figure of the same run. The workers start together on a barrier after
  a warm-up; a cycle worker's time includes the `close` that waits for its background
  removals. The orders of the process counts and of the two operations alternate from round
  to round; the figures are medians over the rounds.
- The latency of `get` in one process while another process prunes 1,000 records, next to
  the same with the prune in the getting process itself (what `--only usage` measures), in
  alternating order.

Run by bench/run.py (`--only procs`). Nothing here asserts a time.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pathlib
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from typing import Any

from bench.run import SNAPSHOTTER, Row, _probe_gets
from pyctrd_cache import CachePolicy, Manager, PrunePolicy, RecordType
from pyctrd_cache.client import Client

COUNTS = (1, 2, 4)
NAMESPACE = "bench-procs"
FLOOR_NAMESPACE = "bench-procs-floor"
PRUNED = 1000


class _Worker:
    """The state of one worker process: its manager (opened on demand), its hot record
    (internal, so that a default prune keeps it) and its probe of `get` latencies."""

    def __init__(self, address: str, state_dir: str, barriers: dict[int, Barrier]) -> None:
        self.address = address
        self.state_dir = state_dir
        self.barriers = barriers
        self.cm: Manager | None = None
        self.client: Client | None = None
        self.floor_leases: list[str] = []
        self.hot_id = ""
        self.probe_done = threading.Event()
        self.latencies: list[float] = []
        self.prober: threading.Thread | None = None

    def manager(self) -> Manager:
        if self.cm is None:
            self.cm = Manager.open(self.address, namespace=NAMESPACE, state_dir=self.state_dir)
            if not self.hot_id:
                hot = self.cm.new(
                    cache_policy=CachePolicy.RETAIN, record_type=RecordType.INTERNAL
                ).commit()
                hot.finalize()
                self.hot_id = hot.id
                hot.release()
        return self.cm

    def open(self) -> None:
        self.manager()

    def cycle(self, n: int) -> None:
        cm = self.manager()
        for _ in range(n):
            snap = cm.new().commit()
            snap.finalize()
            snap.release()

    def bare(self, n: int) -> None:
        """The containerd calls of `n` cycles made bare with the thin client (as
        bench_core's floor), in a namespace of their own."""
        if self.client is None:
            self.client = Client(self.address, namespace=FLOOR_NAMESPACE)
        for _ in range(n):
            mutable, immutable = f"m-{uuid.uuid4().hex}", f"i-{uuid.uuid4().hex}"
            self.client.leases.create(mutable, flat=True)
            self.client.with_lease(mutable).snapshots(SNAPSHOTTER).prepare(mutable)
            self.client.leases.create(immutable, flat=True)
            self.client.with_lease(immutable).snapshots(SNAPSHOTTER).commit(immutable, mutable)
            self.client.leases.delete(mutable)
            self.floor_leases.append(immutable)

    def clean_bare(self) -> None:
        """Deletes what `bare` made; the last deletion waits for the collection."""
        assert self.client is not None
        for i, lease in enumerate(self.floor_leases):
            self.client.leases.delete(lease, sync=i == len(self.floor_leases) - 1)
        self.floor_leases = []

    def get_release(self, n: int) -> None:
        cm = self.manager()
        for _ in range(n):
            cm.get(self.hot_id).release()

    def timed(self, what: str, parties: int, seconds: float) -> tuple[int, float]:
        """Operations done in `seconds` from the barrier of `parties`, and the seconds they
        took (a cycle worker's include the `close` that waits for its removals)."""
        op = {"cycle": self.cycle, "bare": self.bare, "hot": self.get_release}[what]
        batch = 20 if what == "hot" else 1
        op(batch * 3)  # warm-up
        self.barriers[parties].wait(120)
        started = time.perf_counter()
        done = 0
        while time.perf_counter() - started < seconds:
            op(batch)
            done += batch
        if what == "cycle":
            self.close()
        return done, time.perf_counter() - started

    def fill(self, n: int) -> None:
        cm = self.manager()
        for _ in range(n):
            cm.new(cache_policy=CachePolicy.RETAIN).release()

    def prune(self) -> float:
        started = time.perf_counter()
        self.manager().prune()
        return time.perf_counter() - started

    def probe(self) -> None:
        self.probe_done.clear()
        self.latencies = []
        self.prober = threading.Thread(
            target=_probe_gets, args=(self.manager(), self.hot_id, self.probe_done, self.latencies)
        )
        self.prober.start()

    def unprobe(self) -> list[float]:
        assert self.prober is not None
        self.probe_done.set()
        self.prober.join()
        return self.latencies

    def close(self) -> None:
        if self.cm is not None:
            self.cm.close()
            self.cm = None
        if self.client is not None and not self.floor_leases:
            self.client.close()
            self.client = None


def _serve(conn: Connection, address: str, state_dir: str, barriers: dict[int, Barrier]) -> None:
    """A worker process: runs the parent's commands, `(method name, *args)`, and answers
    each with its result, until `None`."""
    worker = _Worker(address, state_dir, barriers)
    while (command := conn.recv()) is not None:
        name, *args = command
        conn.send(getattr(worker, name)(*args))
    worker.close()


class _Pool:
    """Four spawned workers on one state directory."""

    def __init__(self, address: str, state_dir: pathlib.Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        # Kept here: a barrier's semaphore goes when the last reference in this process does.
        self.barriers = {n: ctx.Barrier(n) for n in COUNTS}
        self.conns: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for _ in range(max(COUNTS)):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(
                target=_serve, args=(theirs, address, str(state_dir), self.barriers), daemon=True
            )
            process.start()
            self.conns.append(ours)
            self.processes.append(process)

    def ask(self, workers: Sequence[int], *command: Any) -> list[Any]:
        """Sends `command` to each of `workers` at once, then waits for every answer."""
        for w in workers:
            self.conns[w].send(command)
        return [self.conns[w].recv() for w in workers]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):  # a worker that failed has gone already
                conn.send(None)
        for process in self.processes:
            process.join(120)
            if process.is_alive():
                process.terminate()


def _throughput(pool: _Pool, what: str, parties: int, seconds: float) -> float:
    results: list[tuple[int, float]] = pool.ask(range(parties), "timed", what, parties, seconds)
    return sum(done for done, _ in results) / max(took for _, took in results)


def bench(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """The figures above; each timed stretch lasts `cycles` / 100 seconds (at least one)."""
    seconds = max(1.0, cycles / 100)
    pool = _Pool(address, work / "procs-state")
    try:
        pool.ask(range(max(COUNTS)), "open")  # all at once; the opening is not measured
        rates: dict[tuple[str, int], list[float]] = {}
        for r in range(rounds):
            for what in ("bare", "cycle", "hot")[:: 1 if r % 2 else -1]:
                for parties in COUNTS[:: -1 if r % 2 else 1]:
                    rate = _throughput(pool, what, parties, seconds)
                    rates.setdefault((what, parties), []).append(rate)
                    # What the stretch made goes outside the timing.
                    if what == "cycle":
                        pool.ask([0], "prune")
                    elif what == "bare":
                        pool.ask(range(parties), "clean_bare")
        same: list[list[float]] = []
        other: list[list[float]] = []
        prunes: list[float] = []
        for r in range(max(1, rounds // 2)):
            for prober in (0, 1)[:: -1 if r % 2 else 1]:
                pool.ask([0], "fill", PRUNED)
                pool.ask([prober], "probe")
                prunes += pool.ask([0], "prune")
                (same if prober == 0 else other).append(pool.ask([prober], "unprobe")[0])
        pool.ask(range(max(COUNTS)), "close")
        cm = Manager.open(address, namespace=NAMESPACE, state_dir=work / "procs-state")
        cm.prune(PrunePolicy(all=True))
        cm.close()
    finally:
        pool.close()

    rows: list[Row] = []
    median = {key: statistics.median(values) for key, values in rates.items()}
    one = median[("bare", 1)]
    rows.append(Row("bare containerd calls of the cycle, 1 process", f"{one:,.0f} cycles/s", ""))
    for n in COUNTS[1:]:
        total = median[("bare", n)]
        rows.append(
            Row(f"  {n} processes, total", f"{total:,.0f} cycles/s", f"{total / one:.2f}x one")
        )
    one = median[("cycle", 1)]
    rows.append(Row("new → commit → finalize → release, 1 process", f"{one:,.0f} cycles/s", ""))
    for n in COUNTS[1:]:
        total = median[("cycle", n)]
        note = (
            f"{total / one:.2f}x one process; cost ratio to the bare calls at {n}: "
            f"{median[('bare', n)] / total:.2f}x" + ("; goal ≥ 2x one" if n == 4 else "")
        )
        rows.append(Row(f"  {n} processes, total", f"{total:,.0f} cycles/s", note))
    one = median[("hot", 1)]
    rows.append(Row("hot get/release, 1 process", f"{one:,.0f} ops/s", ""))
    for n in COUNTS[1:]:
        total = median[("hot", n)]
        note = f"{total / one:.2f}x one process, {total / n / one:.2f}x per process; goal ≥ 0.5x"
        rows.append(Row(f"  {n} processes, total", f"{total:,.0f} ops/s", note))
    for name, runs in (("in the pruning process", same), ("in another process", other)):
        worst = max(max(run) for run in runs)
        mid = statistics.median(statistics.median(run) for run in runs)
        rows.append(
            Row(
                f"get during a 1,000-record prune, {name}",
                f"{worst * 1000:.1f} ms worst",
                f"median {mid * 1000:.2f} ms over {sum(map(len, runs))} gets in {len(runs)} "
                f"prunes of {statistics.median(prunes):.2f} s; bound 50 ms",
            )
        )
    return rows
