#!/usr/bin/env python3
"""Benchmarks of pyctrd-cache against a private containerd; prints a table.

Usage: .venv/bin/python -m bench.run [--containerd BINARY] [--only NAME ...]

Every figure is measured in this run on the same daemon: ratios compare the cache with the
bare containerd calls it needs, made with the thin client, alternating rounds so that drift
hits both alike. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyctrd_cache import CachePolicy, EmbeddedContainerd, Manager, PrunePolicy
from pyctrd_cache.client import Client

ROOT = pathlib.Path(__file__).resolve().parent.parent
SNAPSHOTTER = "overlayfs"


@dataclass
class Row:
    name: str
    value: str
    note: str = ""


def _rate(fn: Callable[[int], None], n: int) -> float:
    started = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - started)


def bench_core(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """new → commit → finalize → release, against the same containerd calls made bare."""
    cm = Manager.open(address, namespace="bench-core", state_dir=work / "state")
    bare = Client(address, namespace="bench-floor")
    floor_leases: list[str] = []
    serial = iter(range(10**9))

    def floor(n: int) -> None:
        for _ in range(n):
            i = next(serial)
            mutable, immutable = f"m{i}", f"i{i}"
            bare.leases.create(mutable, flat=True)
            bare.with_lease(mutable).snapshots(SNAPSHOTTER).prepare(mutable)
            bare.leases.create(immutable, flat=True)
            bare.with_lease(immutable).snapshots(SNAPSHOTTER).commit(immutable, mutable)
            bare.leases.delete(mutable)
            floor_leases.append(immutable)

    def cycle(n: int) -> None:
        for _ in range(n):
            snap = cm.new().commit()
            snap.finalize()
            snap.release()
        cm._wait_background()  # the finalized mutables' removal

    hot = cm.new(cache_policy=CachePolicy.RETAIN).commit()
    hot.finalize()
    hot_id = hot.id
    hot.release()

    def get_release(n: int) -> None:
        for _ in range(n):
            cm.get(hot_id).release()

    def round_trip(n: int) -> None:
        for _ in range(n):
            bare.version.get()

    floor(cycles // 4)
    cycle(cycles // 4)  # warm-up
    floor_rates, cycle_rates, hot_rates, rtt_rates = [], [], [], []
    for _ in range(rounds):
        floor_rates.append(_rate(floor, cycles))
        cycle_rates.append(_rate(cycle, cycles))
        hot_rates.append(_rate(get_release, cycles * 4))
        rtt_rates.append(_rate(round_trip, cycles * 4))
    cm.prune(PrunePolicy(all=True))
    cm.close()
    for lease in floor_leases:
        bare.leases.delete(lease)
    bare.close()

    f, c = statistics.median(floor_rates), statistics.median(cycle_rates)
    h, r = statistics.median(hot_rates), statistics.median(rtt_rates)
    return [
        Row("bare containerd calls of the cycle", f"{f:,.0f} cycles/s", "5 RPCs, thin client"),
        Row("new → commit → finalize → release", f"{c:,.0f} cycles/s", ""),
        Row("  cost ratio to the bare calls", f"{f / c:.2f}x", "target ≤ 1.25x"),
        Row("hot get/release", f"{h:,.0f} ops/s", "no containerd call"),
        Row("  next to one containerd round trip", f"{r:,.0f} RPC/s", f"{h / r:.1f}x as many"),
    ]


BENCHES = {"core": bench_core}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / ".containerd" / "bin" / "containerd-2.1"
    parser.add_argument("--containerd", default=str(default) if default.exists() else "containerd")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=sorted(BENCHES))
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="pyctrd-bench-", dir="/tmp"))
    try:
        with EmbeddedContainerd(work / "ctrd", args.containerd) as daemon:
            assert daemon.version is not None
            rows = [Row("containerd", daemon.version.version, args.containerd)]
            for name in args.only:
                rows += BENCHES[name](daemon.address, work, args.cycles, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(r.name) for r in rows)
    value_width = max(len(r.value) for r in rows)
    for r in rows:
        print(f"{r.name:<{width}}  {r.value:>{value_width}}  {r.note}")


if __name__ == "__main__":
    main()
