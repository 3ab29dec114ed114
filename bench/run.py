#!/usr/bin/env python3
"""Benchmarks of pyctrd-cache against a private containerd; prints a table.

Usage: .venv/bin/python -m bench.run [--containerd BINARY] [--only NAME ...]

Every figure is measured in this run on the same daemon: ratios compare the cache with the
bare containerd calls it needs, made with the thin client, alternating rounds so that drift
hits both alike. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gzip
import hashlib
import io
import json
import pathlib
import random
import shutil
import socket
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import httpx
import zstandard

from pyctrd_cache import (
    CachePolicy,
    Compression,
    DescHandler,
    EmbeddedContainerd,
    ImmutableRef,
    Manager,
    Mount,
    PrunePolicy,
    RecordType,
    UnimplementedError,
    export_layout,
    import_path,
    pull,
    pull_layout,
    push,
)
from pyctrd_cache.cache import overlay_diff
from pyctrd_cache.cache.manager import _MEASURERS
from pyctrd_cache.client import Client, Descriptor
from pyctrd_cache.compression import _ZSTD_LEVEL as ZSTD_LEVEL
from pyctrd_cache.compression import OCI_LAYER as TAR
from pyctrd_cache.compression import OCI_LAYER_ZSTD as TAR_ZSTD
from pyctrd_cache.compression import decompressed_chunks, media_type_for
from tests.stargz_fix import write_estargz_layout

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


def _layer_data(seed: int, size: int) -> bytes:
    """Half random, half text: compresses about as well as a typical layer."""
    rng = random.Random(seed)
    text = b"".join(
        f"line {i} of layer {seed}: {rng.random()}\n".encode() for i in range(size // 80)
    )
    return rng.randbytes(size // 2) + text[: size - size // 2]


def _chain(cm: Manager, layers: int, layer_size: int, seed: int) -> list[ImmutableRef]:
    refs: list[ImmutableRef] = []
    for i in range(layers):
        work = cm.new(refs[-1] if refs else None)
        with work.mount(readonly=False) as root:
            (root / f"layer-{i}").write_bytes(_layer_data(seed * 100 + i, layer_size))
        snap = work.commit()
        snap.finalize()
        refs.append(snap)
    return refs


def _diff_directly(
    client: Client, snapshotter: str, refs: list[ImmutableRef], media: str
) -> float | None:
    """Seconds the diff service takes for every layer of the chain, all at once as
    get_remote does, with the views it diffs made and removed; None when the daemon cannot
    write `media` (zstd before containerd 1.7.29 and 2.0.1)."""
    lease = client.leases.create(flat=True)
    leased = client.with_lease(lease.id)
    sn = leased.snapshots(snapshotter)
    unsupported: list[bool] = []

    def diff(lower: list[Mount], upper: list[Mount]) -> None:
        try:
            leased.diff.diff(lower, upper, media_type=media)
        except UnimplementedError:
            unsupported.append(True)

    try:
        started = time.perf_counter()
        views = [sn.view(f"bench-{ref.id}", ref.info().snapshot_id) for ref in refs]
        threads = [
            threading.Thread(target=diff, args=(lower, upper))
            for lower, upper in zip([[], *views], views, strict=False)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for ref in refs:
            sn.remove(f"bench-{ref.id}")
        elapsed = time.perf_counter() - started
    finally:
        client.leases.delete(lease.id, sync=True)
    return None if unsupported else elapsed


def _zstd_alone(client: Client, descs: Sequence[Descriptor]) -> float:
    """Seconds zstd at the cache's level takes to compress the layer tars `descs`, read into
    memory first and compressed one after the other on every core: the floor of a zstd
    `get_remote` on this machine, whatever makes the tar."""
    tars = [b"".join(client.content.read(d.digest)) for d in descs]
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    started = time.perf_counter()
    for tar in tars:
        compressor.compress(tar)
    return time.perf_counter() - started


def bench_remote(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """get_remote on a ten-layer chain of 16 MiB layers in each compression, against each
    other and against the diff service called directly for the same layers (uncompressed,
    and in the same compression where the daemon can write it); gzip to zstd conversion
    against gzip -dc | zstd."""
    del cycles
    layers, layer_size = 10, 16 << 20
    cm = Manager.open(address, namespace="bench-remote", state_dir=work / "remote-state")
    bare = Client(address, namespace="bench-remote")
    compressions = (Compression.UNCOMPRESSED, Compression.GZIP, Compression.ZSTD)
    ours: dict[Compression, list[float]] = {c: [] for c in compressions}
    plain_floor: dict[Compression, list[float]] = {c: [] for c in compressions}
    same_floor: dict[Compression, list[float]] = {c: [] for c in compressions}
    zstd_alone: list[float] = []
    for r in range(max(1, rounds // 2)):
        for compression in compressions[:: 1 if r % 2 else -1]:
            refs = _chain(cm, layers, layer_size, seed=r)
            plain = _diff_directly(bare, cm.snapshotter, refs, TAR)
            assert plain is not None
            plain_floor[compression].append(plain)
            same = _diff_directly(bare, cm.snapshotter, refs, media_type_for(compression))
            if same is not None:
                same_floor[compression].append(same)
            started = time.perf_counter()
            remote = refs[-1].get_remote(compression=compression)
            ours[compression].append(time.perf_counter() - started)
            if compression is Compression.UNCOMPRESSED:
                zstd_alone.append(_zstd_alone(bare, remote.descriptors))
            for ref in refs:
                ref.release()
            cm.prune(PrunePolicy(all=True))
    rows = []
    u = statistics.median(ours[Compression.UNCOMPRESSED])
    for compression in compressions:
        o = statistics.median(ours[compression])
        p = statistics.median(plain_floor[compression])
        note = f"{o / u:.2f}x uncompressed get_remote, {o / p:.2f}x the uncompressed diffs"
        if same_floor[compression] and compression is not Compression.UNCOMPRESSED:
            same = statistics.median(same_floor[compression])
            note += f", {o / same:.2f}x the {compression.value} diffs"
        elif not same_floor[compression]:
            note += f" (the daemon cannot diff to {compression.value})"
        rows.append(Row(f"get_remote, 10 x 16 MiB, {compression.value}", f"{o:.2f} s", note))
    z = statistics.median(zstd_alone)
    rows.append(
        Row(
            "zstd level 3 alone, the same 10 tars",
            f"{z:.2f} s",
            f"{z / u:.2f}x uncompressed get_remote (in memory, on every core; "
            "zstd within 1.2x of uncompressed leaves 0.20x for it)",
        )
    )

    # gzip -> zstd conversion of one 64 MiB layer.
    (ref,) = _chain(cm, 1, 64 << 20, seed=99)
    gz = ref.get_remote(compression=Compression.GZIP).descriptors[0]
    blob_path = work / "layer.tar.gz"
    with open(blob_path, "wb") as out:
        for chunk in bare.content.read(gz.digest):
            out.write(chunk)
    converted: list[float] = []
    shell: list[float] = []
    for _ in range(rounds):
        other = cm.get_by_blob(gz)
        started = time.perf_counter()
        other.get_remote(compression=Compression.ZSTD, force_compression=True)
        converted.append(time.perf_counter() - started)
        other.release()
        started = time.perf_counter()
        subprocess.run(f"gzip -dc {blob_path} | zstd -q -3 -c > /dev/null", shell=True, check=True)
        shell.append(time.perf_counter() - started)
        # Drop the variant so the next round converts again.
        for info in bare.content.list(f'labels."buildkit.io/compression/mediatype"=={TAR_ZSTD}'):
            bare.content.delete(info.digest)
        bare.content.update_labels(gz.digest, {}, fields=["buildkit.io/compression/digest.zstd"])
    size_mb = _uncompressed_size(bare, gz.digest) / 1e6
    o, s = statistics.median(converted), statistics.median(shell)
    rows.append(
        Row(
            "gzip -> zstd conversion, 64 MiB layer",
            f"{size_mb / o:,.0f} MB/s",
            f"gzip -dc | zstd: {size_mb / s:,.0f} MB/s, time ratio {o / s:.2f}x",
        )
    )
    ref.release()
    cm.prune(PrunePolicy(all=True))
    cm.close()
    bare.close()
    return rows


def _one_diff(client: Client, snapshotter: str, parent: ImmutableRef, child: ImmutableRef) -> float:
    """Seconds the diff service takes for the child's layer (gzip), on views of both."""
    lease = client.leases.create(flat=True)
    sn = client.with_lease(lease.id).snapshots(snapshotter)
    try:
        lower = sn.view(f"bench-lower-{lease.id}", parent.info().snapshot_id)
        upper = sn.view(f"bench-upper-{lease.id}", child.info().snapshot_id)
        started = time.perf_counter()
        client.with_lease(lease.id).diff.diff(lower, upper)
        return time.perf_counter() - started
    finally:
        client.leases.delete(lease.id, sync=True)


def bench_small_change(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """The gzip blob of a one-file change on a 20,000-file base: get_remote (whose differ
    writes it from the overlay upper directory) against the diff service called directly on
    the same two snapshots, in alternating rounds, a fresh change each round."""
    del cycles
    files = 20_000
    cm = Manager.open(address, namespace="bench-small", state_dir=work / "small-state")
    bare = Client(address, namespace="bench-small")
    base_work = cm.new()
    with base_work.mount(readonly=False) as root:
        for i in range(files):
            directory = root / f"d{i % 200:03d}"
            directory.mkdir(exist_ok=True)
            (directory / f"f{i:05d}").write_bytes(b"%d\n" % i * 10)
    base = base_work.commit()
    base.get_remote()  # the base's own blob, made once
    ours, theirs, routes = [], [], []
    route = overlay_diff.try_write

    def timed_route(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return route(*args, **kwargs)
        finally:
            routes.append(time.perf_counter() - started)

    overlay_diff.try_write = timed_route
    for r in range(rounds * 2):
        work_ref = cm.new(base)
        with work_ref.mount(readonly=False) as root:
            (root / "d007" / "f00007").write_bytes(b"changed in round %d\n" % r)
        child = work_ref.commit()
        child.finalize()
        for measure in ("theirs", "ours") if r % 2 else ("ours", "theirs"):
            if measure == "theirs":
                theirs.append(_one_diff(bare, cm.snapshotter, base, child))
            else:
                started = time.perf_counter()
                child.get_remote()
                ours.append(time.perf_counter() - started)
        child.release()
    overlay_diff.try_write = route
    base.release()
    cm.prune(PrunePolicy(all=True))
    cm.close()
    bare.close()
    o, t, w = (statistics.median(x) for x in (ours, theirs, routes))
    return [
        Row("one-file change on 20,000 files, diff service", f"{t * 1000:.0f} ms", "gzip"),
        Row(
            "  get_remote of the change (upper directory)",
            f"{o * 1000:.0f} ms",
            f"{o / t:.2f}x the diff service's time",
        ),
        Row(
            "  of which the blob's writing",
            f"{w * 1000:.0f} ms",
            f"{w / t:.2f}x the diff service's time",
        ),
    ]


def _uncompressed_size(client: Client, digest: str) -> int:
    return sum(
        len(chunk) for chunk in decompressed_chunks(client.content.read(digest), Compression.GZIP)
    )


def _probe_gets(cm: Manager, record_id: str, done: threading.Event, out: list[float]) -> None:
    while not done.is_set():
        started = time.perf_counter()
        cm.get(record_id, update_last_used=False).release()
        out.append(time.perf_counter() - started)
        time.sleep(0.001)


def bench_usage(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """disk_usage and prune at 1,000 and 10,000 records, and get latency during a prune."""
    del cycles, rounds
    rows: list[Row] = []
    times: dict[tuple[str, int], float] = {}
    for count in (1000, 10000):
        cm = Manager.open(address, namespace=f"bench-du-{count}", state_dir=work / f"du-{count}")
        keep = cm.new(cache_policy=CachePolicy.RETAIN, record_type=RecordType.INTERNAL)
        keep_id = keep.id
        keep.release()
        for _ in range(count):
            cm.new(cache_policy=CachePolicy.RETAIN).release()
        for label in ("du (sizes computed)", "du (sizes cached)"):
            started = time.perf_counter()
            cm.disk_usage()
            times[(label, count)] = time.perf_counter() - started
        latencies: list[float] = []
        done = threading.Event()
        prober = threading.Thread(target=_probe_gets, args=(cm, keep_id, done, latencies))
        prober.start()
        started = time.perf_counter()
        cm.prune()
        times[("prune", count)] = time.perf_counter() - started
        done.set()
        prober.join()
        if count == 1000:
            latencies.sort()
            rows.append(
                Row(
                    "get during a 1,000-record prune",
                    f"{latencies[-1] * 1000:.1f} ms worst",
                    f"median {statistics.median(latencies) * 1000:.2f} ms over "
                    f"{len(latencies)} gets; bound 50 ms",
                )
            )
        cm.prune(PrunePolicy(all=True))
        cm.close()
    for label in ("du (sizes computed)", "du (sizes cached)", "prune"):
        small, large = times[(label, 1000)], times[(label, 10000)]
        rows.append(
            Row(
                f"{label}, 1k / 10k records",
                f"{small:.2f} s / {large:.2f} s",
                f"growth {large / small:.1f}x for 10x the records",
            )
        )
    return rows


_buildkit_binary: str | None = None
"""BuildKit's cache manager timed by bench/buildkit (set by `main` from `--buildkit`)."""


def _buildkit(address: str, work: pathlib.Path, op: str, *args: str) -> float:
    """Seconds BuildKit's own cache manager took for `op` on the same daemon (see
    bench/buildkit/main.go)."""
    assert _buildkit_binary is not None
    root = work / f"bk-{uuid.uuid4().hex}"
    out = subprocess.run(
        [_buildkit_binary, "-address", address, "-root", str(root), "-op", op, *args],
        capture_output=True,
        text=True,
    )
    shutil.rmtree(root, ignore_errors=True)
    if out.returncode:
        raise RuntimeError(f"{_buildkit_binary} -op {op} failed: {out.stderr.strip()}")
    return float(out.stdout.split()[-1])


def _versus_buildkit(name: str, ours: list[float], go: list[float]) -> Row:
    """BuildKit's median time, and the median of the per-round ratios (each round's two
    figures were taken one after the other, so a change of the machine's load between
    rounds does not move the ratio)."""
    ratio = statistics.median(o / g for o, g in zip(ours, go, strict=True))
    return Row(
        f"  {name}, BuildKit a9f1980eb", f"{statistics.median(go):.2f} s", f"py/go {ratio:.2f}x"
    )


def _gzip_layers(layers: int, layer_size: int) -> list[tuple[Descriptor, bytes]]:
    """`layers` gzip layer blobs of one `layer_size` file each (half random, half text), with
    their diff ids as annotations."""
    out = []
    for i in range(layers):
        tar_bytes = io.BytesIO()
        with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
            data = _layer_data(7000 + i, layer_size)
            member = tarfile.TarInfo(f"layer-{i}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        plain = tar_bytes.getvalue()
        blob = gzip.compress(plain, compresslevel=6, mtime=0)
        desc = Descriptor(
            media_type_for(Compression.GZIP),
            "sha256:" + hashlib.sha256(blob).hexdigest(),
            len(blob),
            {"containerd.io/uncompressed": "sha256:" + hashlib.sha256(plain).hexdigest()},
        )
        out.append((desc, blob))
    return out


class _MemoryProvider:
    """Blobs from memory, by digest."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self._blobs = blobs

    def open(self, desc: Descriptor) -> BinaryIO:
        return io.BytesIO(self._blobs[desc.digest])


def _write_and_apply_directly(
    client: Client, snapshotter: str, layers: Sequence[tuple[Descriptor, bytes]]
) -> None:
    """The floor of get_by_blob + extract: every blob written to the content store at once,
    each layer applied onto its parent's snapshot (prepare, apply, commit) once its blob is
    there, in chain order."""
    lease = client.leases.create(flat=True)
    leased = client.with_lease(lease.id)
    sn = leased.snapshots(snapshotter)
    try:
        written = [threading.Event() for _ in layers]

        def write(i: int) -> None:
            desc, blob = layers[i]
            leased.content.write(f"floor-{desc.digest}", blob, expected=desc.digest, size=desc.size)
            written[i].set()

        threads = [threading.Thread(target=write, args=(i,)) for i in range(len(layers))]
        for t in threads:
            t.start()
        parent = ""
        for i, (desc, _) in enumerate(layers):
            written[i].wait()
            key = f"floor-{i}-{uuid.uuid4().hex}"
            mounts = sn.prepare(f"{key}-active", parent)
            leased.diff.apply(desc, mounts)
            sn.commit(key, f"{key}-active")
            parent = key
        for t in threads:
            t.join()
    finally:
        client.leases.delete(lease.id, sync=True)


def bench_blobs(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """get_by_blob + extract of ten 16 MiB gzip layers pulled from a provider in memory,
    against the same blobs written and applied with the thin client, alternating rounds."""
    del cycles
    layers = _gzip_layers(10, 16 << 20)
    provider = _MemoryProvider({desc.digest: blob for desc, blob in layers})
    cm = Manager.open(address, namespace="bench-blobs", state_dir=work / "blobs-state")
    bare = Client(address, namespace="bench-blobs-floor")
    blob_list = work / "blobs.json"
    entries = []
    for desc, blob in layers:
        path = work / desc.digest.replace(":", "-")
        path.write_bytes(blob)
        entries.append({"descriptor": desc.to_oci(), "path": str(path)})
    blob_list.write_text(json.dumps(entries))
    floor_times, ours_times, go_times = [], [], []
    for _ in range(rounds):
        if _buildkit_binary is not None:
            go_times.append(_buildkit(address, work, "blobs", "-blobs", str(blob_list)))
        started = time.perf_counter()
        _write_and_apply_directly(bare, cm.snapshotter, layers)
        floor_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        refs: list[ImmutableRef] = []
        for desc, _ in layers:
            refs.append(
                cm.get_by_blob(
                    desc,
                    refs[-1] if refs else None,
                    desc_handlers={desc.digest: DescHandler(provider)},
                )
            )
        refs[-1].extract()
        ours_times.append(time.perf_counter() - started)
        for ref in refs:
            ref.release()
        cm.prune(PrunePolicy(all=True))
    cm.close()
    bare.close()
    f, o = statistics.median(floor_times), statistics.median(ours_times)
    rows = [
        Row(
            "get_by_blob + extract, 10 x 16 MiB gzip",
            f"{o:.2f} s",
            f"content write + apply directly {f:.2f} s, ratio {o / f:.2f}x",
        )
    ]
    if go_times:
        rows.append(_versus_buildkit("get_by_blob + extract", ours_times, go_times))
    return rows


def _forget_sizes(cm: Manager) -> None:
    """Drops every record's measured size, so that the next disk_usage measures again."""
    for rec in list(cm._core.records.values()):
        with rec.mu:
            rec.invalidate_size()


def _usage_directly(client: Client, snapshotter: str, names: Sequence[str], width: int) -> None:
    """The floor of disk_usage: one Usage call per snapshot, `width` at a time."""
    sn = client.snapshots(snapshotter)
    with concurrent.futures.ThreadPoolExecutor(width) as pool:
        for _ in pool.map(sn.usage, names):
            pass


def bench_usage_ratio(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """disk_usage of 1,000 records whose sizes are unknown, against the Usage calls it needs
    made directly at the same width, alternating rounds."""
    del cycles
    count = 1000
    cm = Manager.open(address, namespace="bench-du-ratio", state_dir=work / "du-ratio")
    for _ in range(count):
        cm.new(cache_policy=CachePolicy.RETAIN).release()
    bare = Client(address, namespace="bench-du-ratio")
    names = [rec.md.snapshot_id for rec in cm._core.records.values()]
    floor_times, ours_times, go_times = [], [], []
    for _ in range(rounds):
        if _buildkit_binary is not None:
            go_times.append(_buildkit(address, work, "du"))
        _forget_sizes(cm)
        started = time.perf_counter()
        _usage_directly(bare, cm.snapshotter, names, _MEASURERS)
        floor_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        cm.disk_usage()
        ours_times.append(time.perf_counter() - started)
    cm.prune(PrunePolicy(all=True))
    cm.close()
    bare.close()
    f, o = statistics.median(floor_times), statistics.median(ours_times)
    rows = [
        Row(
            "du (sizes computed), 1,000 records",
            f"{o:.2f} s",
            f"{count} Usage calls directly, {_MEASURERS} at a time: {f:.2f} s, ratio {o / f:.2f}x",
        )
    ]
    if go_times:
        rows.append(_versus_buildkit("du (sizes computed)", ours_times, go_times))
    return rows


def bench_remote_buildkit(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """get_remote, uncompressed and gzip, of a fresh ten-layer chain of 16 MiB layers per
    round, next to the diff service called directly for the same layers and, with
    `--buildkit`, to BuildKit's GetRemote of a chain of its own of the same shape, in
    alternating rounds."""
    del cycles
    cm = Manager.open(address, namespace="bench-remote-bk", state_dir=work / "remote-bk-state")
    bare = Client(address, namespace="bench-remote-bk")
    rows = []
    for compression in (Compression.UNCOMPRESSED, Compression.GZIP):
        floor_times, ours_times, go_times = [], [], []
        for r in range(rounds):
            if _buildkit_binary is not None:
                # BuildKit's chain of the same shape: the same generator, another seed.
                data = work / "bk-layers"
                data.mkdir()
                for i in range(10):
                    (data / f"layer-{i}").write_bytes(_layer_data(200000 + r * 100 + i, 16 << 20))
                op = f"remote-{compression.value}"
                go_times.append(_buildkit(address, work, op, "-data", str(data)))
                shutil.rmtree(data)
            refs = _chain(cm, 10, 16 << 20, seed=1000 + r)
            started = time.perf_counter()
            _diff_directly(bare, cm.snapshotter, refs, media_type_for(compression))
            floor_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            refs[-1].get_remote(compression=compression)
            ours_times.append(time.perf_counter() - started)
            for ref in refs:
                ref.release()
            cm.prune(PrunePolicy(all=True))
        f, o = statistics.median(floor_times), statistics.median(ours_times)
        name = f"get_remote, 10 x 16 MiB, {compression.value}"
        rows.append(Row(name, f"{o:.2f} s", f"diff service directly {f:.2f} s, ratio {o / f:.2f}x"))
        if go_times:
            rows.append(_versus_buildkit("get_remote", ours_times, go_times))
    cm.close()
    bare.close()
    return rows


def _tree(root: pathlib.Path, total: int) -> None:
    """A tree of `total` bytes in 1 MiB files over 16 directories, half random, half text."""
    for i in range(total >> 20):
        directory = root / f"d{i % 16:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{i:04d}").write_bytes(_layer_data(i, 1 << 20))


def bench_layouts(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """Import of a 512 MiB tree and its export as a gzip OCI layout, next to
    `tar -c | gzip` of the same tree."""
    del cycles
    size = 512 << 20
    tree = work / "tree"
    _tree(tree, size)
    cm = Manager.open(address, namespace="bench-layouts", state_dir=work / "layouts-state")
    imports, exports, shell = [], [], []
    for r in range(max(1, rounds // 2)):
        started = time.perf_counter()
        subprocess.run(f"tar -C {tree} -c . | gzip -6 > /dev/null", shell=True, check=True)
        shell.append(time.perf_counter() - started)
        started = time.perf_counter()
        ref = import_path(cm, tree)
        imports.append(time.perf_counter() - started)
        started = time.perf_counter()
        export_layout(ref, work / f"layout-{r}", compression=Compression.GZIP)
        exports.append(time.perf_counter() - started)
        ref.release()
        cm.prune(PrunePolicy(all=True))
        shutil.rmtree(work / f"layout-{r}")
    cm.close()
    mb = size / 1e6
    i, e, t = (statistics.median(x) for x in (imports, exports, shell))
    return [
        Row("tar -c | gzip, 512 MiB tree", f"{mb / t:,.0f} MB/s", f"{t:.1f} s"),
        Row("import of the tree", f"{mb / i:,.0f} MB/s", f"{i:.1f} s, {i / t:.2f}x the time"),
        Row(
            "export as gzip OCI layout", f"{mb / e:,.0f} MB/s", f"{e:.1f} s, {e / t:.2f}x the time"
        ),
    ]


@contextlib.contextmanager
def _registry(work: pathlib.Path) -> Iterator[str]:
    """Debian's docker-registry without auth on a free 127.0.0.1 port; yields host:port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{s.getsockname()[1]}"
    config = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(work / "registry")}},
        "http": {"addr": host, "secret": uuid.uuid4().hex},
    }
    (work / "registry.yml").write_text(json.dumps(config))
    process = subprocess.Popen(
        ["docker-registry", "serve", str(work / "registry.yml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{host}/v2/", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not start")
            time.sleep(0.1)
        yield host
    finally:
        process.terminate()
        process.wait()


def bench_registry(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """Push of a ten-layer chain of 16 MiB layers (gzip blobs made beforehand) to a registry
    on loopback, next to `skopeo copy` of the same image from an OCI layout; lazy pull of it
    into another namespace, and its extraction."""
    del cycles
    layers, layer_size = 10, 16 << 20
    cm = Manager.open(address, namespace="bench-registry", state_dir=work / "registry-state")
    other = Manager.open(address, namespace="bench-pulled", state_dir=work / "pulled-state")
    pushes, copies, pulls, extracts = [], [], [], []
    with _registry(work) as host:
        for r in range(max(1, rounds // 2)):
            refs = _chain(cm, layers, layer_size, seed=r)
            layout = work / f"registry-layout-{r}"
            export_layout(refs[-1], layout, tag="v1")  # makes the gzip blobs too
            started = time.perf_counter()
            subprocess.run(
                [
                    "skopeo",
                    "copy",
                    "-q",
                    "--dest-tls-verify=false",
                    f"oci:{layout}:v1",
                    f"docker://{host}/bench/skopeo-{r}:1",
                ],
                check=True,
            )
            copies.append(time.perf_counter() - started)
            target = f"{host}/bench/ours-{r}:1"
            started = time.perf_counter()
            push(refs[-1], target, insecure=True)
            pushes.append(time.perf_counter() - started)
            started = time.perf_counter()
            pulled = pull(other, target, insecure=True)
            pulls.append(time.perf_counter() - started)
            started = time.perf_counter()
            pulled.extract()
            extracts.append(time.perf_counter() - started)
            pulled.release()
            for ref in refs:
                ref.release()
            for m in (cm, other):
                m.prune(PrunePolicy(all=True))
            shutil.rmtree(layout)
    cm.close()
    other.close()
    p, c, lp, x = (statistics.median(v) for v in (pushes, copies, pulls, extracts))
    mb = layers * layer_size / 1e6
    return [
        Row(
            "skopeo copy oci: -> registry, 10 x 16 MiB",
            f"{c:.2f} s",
            f"{mb / c:,.0f} MB/s of layers",
        ),
        Row("push to the registry", f"{p:.2f} s", f"{mb / p:,.0f} MB/s, {p / c:.2f}x skopeo copy"),
        Row("lazy pull (manifest, config, HEADs, records)", f"{lp * 1000:.0f} ms", ""),
        Row("extract of the lazy pull", f"{x:.2f} s", f"{mb / x:,.0f} MB/s"),
    ]


_containerd_binary = "containerd"
"""The containerd under test (set by `main`), for benchmarks that start a daemon of their own."""


def bench_stargz(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """Time to the first file read of an eStargz image (two layers, 48 MiB) through the
    stargz snapshotter (tests/stargz, `-no-background-fetch`): pull, mount, read one small
    file; next to a full pull-and-extract of the same image on overlayfs, mounted and read
    the same way. Both on one containerd with both snapshotters, from one registry."""
    del address, cycles
    built = subprocess.run(
        [str(ROOT / "tests" / "stargz" / "build")], capture_output=True, text=True, check=True
    )
    sgz = work / "sgz"
    sgz.mkdir()
    with _registry(work) as host:
        snapshotter = subprocess.Popen(
            [
                built.stdout.split()[-1],
                "-address",
                str(sgz / "stargz.sock"),
                "-root",
                str(sgz / "root"),
                "-no-background-fetch",
                "-plain-http",
                host,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not (sgz / "stargz.sock").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            with EmbeddedContainerd(
                sgz / "ctrd",
                _containerd_binary,
                proxy_snapshotters={"stargz": str(sgz / "stargz.sock")},
            ) as daemon:
                lazy, full = _first_reads(daemon.address, work, host, max(1, rounds // 2))
        finally:
            snapshotter.terminate()
            snapshotter.wait()
            # The FUSE mounts of the snapshotter, if it left any.
            for line in reversed(pathlib.Path("/proc/self/mountinfo").read_text().splitlines()):
                point = line.split()[4]
                if point.startswith(str(sgz) + "/"):
                    subprocess.run(["umount", "-l", point], check=False)
    lz, fl = statistics.median(lazy), statistics.median(full)
    return [
        Row("first file read, stargz snapshotter (lazy)", f"{lz * 1000:.0f} ms", "48 MiB image"),
        Row(
            "first file read after pull and extract",
            f"{fl * 1000:.0f} ms",
            f"{fl / lz:.1f}x the stargz time",
        ),
    ]


def bench_estargz(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """Conversion of a 64 MiB layer of 1 MiB files (half random, half text) from its
    uncompressed blob to eStargz, next to its conversion to gzip, in alternating rounds."""
    del cycles
    tree = work / "estargz-tree"
    _tree(tree, 64 << 20)
    cm = Manager.open(address, namespace="bench-estargz", state_dir=work / "estargz-state")
    bare = Client(address, namespace="bench-estargz")
    ref = import_path(cm, tree)
    (plain,) = ref.get_remote(compression=Compression.UNCOMPRESSED).descriptors
    times: dict[Compression, list[float]] = {Compression.GZIP: [], Compression.ESTARGZ: []}
    for _ in range(rounds):
        for compression, out in times.items():
            started = time.perf_counter()
            ref.get_remote(compression=compression, force_compression=True)
            out.append(time.perf_counter() - started)
            # Drop the variant so the next round converts again.
            media = f'labels."buildkit.io/compression/mediatype"=={media_type_for(compression)}'
            for info in bare.content.list(media):
                bare.content.delete(info.digest)
            bare.content.update_labels(
                plain.digest,
                {},
                fields=[
                    f"buildkit.io/compression/digest.{compression.value}",
                    f"containerd.io/gc.ref.content.buildkit.compression.{compression.value}",
                ],
            )
    ref.release()
    cm.prune(PrunePolicy(all=True))
    cm.close()
    bare.close()
    mb = plain.size / 1e6
    g, e = (statistics.median(times[c]) for c in (Compression.GZIP, Compression.ESTARGZ))
    return [
        Row("uncompressed -> gzip conversion, 64 MiB layer", f"{mb / g:,.0f} MB/s", f"{g:.2f} s"),
        Row(
            "uncompressed -> eStargz conversion, same layer",
            f"{mb / e:,.0f} MB/s",
            f"{e:.2f} s, {e / g:.2f}x the gzip conversion's time",
        ),
    ]


def _first_reads(
    address: str, work: pathlib.Path, host: str, rounds: int
) -> tuple[list[float], list[float]]:
    """Seconds to the first read through each snapshotter, one fresh image per round."""
    source = Manager.open(address, namespace="bench-sgz-src", state_dir=work / "sgz-src")
    lazy: list[float] = []
    full: list[float] = []
    for r in range(rounds):
        rng = random.Random(r)
        big = rng.randbytes(32 << 20)
        trees = [
            {"usr/lib/big.bin": big, "etc/motd": f"round {r}\n".encode()},
            {"srv/data.bin": big[: 16 << 20], "etc/hostname": b"bench\n"},
        ]
        image = write_estargz_layout(work / f"sgz-layout-{r}", trees, "v1", 1 << 20)
        pushed = pull_layout(source, image.layout, "v1")
        target = f"{host}/bench/sgz-{r}:1"
        push(pushed, target, insecure=True)
        pushed.release()
        for snapshotter, out in (("stargz", lazy), ("overlayfs", full))[:: 1 if r % 2 else -1]:
            cm = Manager.open(
                address,
                namespace=f"bench-{snapshotter}-{r}",
                snapshotter=snapshotter,
                state_dir=work / f"sgz-{snapshotter}-{r}",
            )
            started = time.perf_counter()
            ref = pull(cm, target, insecure=True, extract=snapshotter == "overlayfs")
            with ref.mount() as root:
                (root / "etc" / "motd").read_bytes()
                out.append(time.perf_counter() - started)
            ref.release()
            cm.prune(PrunePolicy(all=True))
            cm.close()
        source.prune(PrunePolicy(all=True))
        shutil.rmtree(image.layout)
    source.close()
    return lazy, full


def bench_procs(address: str, work: pathlib.Path, cycles: int, rounds: int) -> list[Row]:
    """Several processes on one state directory (bench/procs.py, which imports this module)."""
    from bench import procs

    return procs.bench(address, work, cycles, rounds)


BENCHES = {
    "core": bench_core,
    "remote": bench_remote,
    "small-change": bench_small_change,
    "usage": bench_usage,
    "blobs": bench_blobs,
    "du": bench_usage_ratio,
    "remote-bk": bench_remote_buildkit,
    "layouts": bench_layouts,
    "registry": bench_registry,
    "stargz": bench_stargz,
    "estargz": bench_estargz,
    "procs": bench_procs,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / ".containerd" / "bin" / "containerd-2.1"
    parser.add_argument("--containerd", default=str(default) if default.exists() else "containerd")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=sorted(BENCHES))
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--buildkit",
        metavar="BKBENCH",
        help="bench/buildkit's binary: time BuildKit's cache manager in the same rounds "
        "(blobs, du, remote-bk)",
    )
    args = parser.parse_args()
    global _containerd_binary, _buildkit_binary
    _containerd_binary = args.containerd
    _buildkit_binary = args.buildkit
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
