"""The mixed workload the crash, daemon-restart and concurrency tests run.

Each step is one random operation of a cache user: new (on a kept record or on nothing),
writes through a mount or `apply`, commit, finalize, `get_by_blob` of lazy blobs (chains of
them), extract, `get_remote` with conversion, release, and prune of what is not kept.

A record becomes *kept* once it is retained, committed and finalized (or, for a blob record,
extracted): the workload reports it with the digest of its tree (`tree_digest`), and the
record must survive any fault with that tree. Kept records carry the description `keep`, so
the workload's own prunes (`description!=keep`) never take them; the tests' final
`prune(PrunePolicy(all=True))` does.

Run as a child process: `python -m tests.reliability.workload ADDRESS NAMESPACE STATE_DIR
SEED SECONDS [--tolerate-unavailable]`. It prints `ready`, then `keep <id> <digest>` for each
kept record, `fault` for each call that containerd's absence made retry or give up with
`UnavailableError`, and, when it ran its time out, `done <steps> <unavailable>`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pathlib
import random
import stat
import threading
import time
from collections.abc import Callable

from tenacity import Retrying

from pyctrd_cache import (
    CachePolicy,
    Compression,
    DescHandler,
    ImmutableRef,
    Manager,
    MutableRef,
    PrunePolicy,
    UnavailableError,
)
from pyctrd_cache.client._transport import Transport
from tests.layers import TAR, TAR_GZIP, TAR_ZSTD, BytesProvider, layer, make_tar

KEEP = "keep"


def tree_digest(root: pathlib.Path) -> str:
    """A digest of a directory tree: relative paths, kinds, modes, file contents and link
    targets, in sorted order."""
    h = hashlib.sha256()
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = pathlib.Path(directory, name)
            st = path.lstat()
            h.update(f"{path.relative_to(root)}\0{stat.S_IFMT(st.st_mode)}\0".encode())
            h.update(f"{stat.S_IMODE(st.st_mode):o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(path.read_bytes())
            h.update(b"\n")
    return "sha256:" + h.hexdigest()


def ref_digest(ref: ImmutableRef) -> str:
    with ref.mount() as target:
        return tree_digest(target)


class Workload:
    """Random cache operations on one manager; thread-safe, so threads may share one."""

    def __init__(
        self,
        cm: Manager,
        report: Callable[[str, str], None],
        *,
        tolerate_unavailable: bool = False,
        fault: Callable[[], None] = lambda: None,
    ) -> None:
        self.cm = cm
        self.report = report
        self.tolerate_unavailable = tolerate_unavailable
        self.fault = fault
        self.provider = BytesProvider()
        self._mu = threading.Lock()
        self.kept: list[str] = []
        self.steps = 0
        self.unavailable = 0

    def _keep(self, ref: ImmutableRef) -> None:
        digest = ref_digest(ref)
        with self._mu:
            self.kept.append(ref.id)
        self.report(ref.id, digest)

    def _kept_parent(self, rng: random.Random) -> ImmutableRef | None:
        with self._mu:
            choices = list(self.kept)
        if not choices or rng.random() < 0.3:
            return None
        return self.cm.get(rng.choice(choices))

    def _files(self, rng: random.Random) -> dict[str, bytes]:
        return {
            f"d{rng.randrange(4)}/f{rng.randrange(1000)}": rng.randbytes(rng.randrange(1, 40_000))
            for _ in range(rng.randrange(1, 5))
        }

    def step(self, rng: random.Random) -> None:
        """One operation; under `tolerate_unavailable`, an `UnavailableError` counts and
        the step ends (whatever it held released)."""
        op = rng.choice(
            [self.build, self.build, self.apply, self.lazy_chain, self.remote, self.prune]
        )
        try:
            op(rng)
        except UnavailableError:
            if not self.tolerate_unavailable:
                raise
            self.fault()
            with self._mu:
                self.unavailable += 1
        with self._mu:
            self.steps += 1

    def _finish(self, active_ref: ImmutableRef, rng: random.Random, retain: bool) -> None:
        with active_ref:
            if rng.random() < 0.7 or retain:
                active_ref.finalize()
            if retain:
                self._keep(active_ref)

    def _new_and_commit(
        self,
        rng: random.Random,
        write: Callable[[MutableRef, random.Random], None],
        *,
        abandon: float = 0.0,
    ) -> None:
        """new on a kept record (or on nothing), `write` into it, commit, maybe finalize
        and keep; with probability `abandon` the mutable record is released uncommitted."""
        retain = rng.random() < 0.5
        parent = self._kept_parent(rng)
        with parent if parent is not None else contextlib.nullcontext():
            active = self.cm.new(
                parent,
                cache_policy=CachePolicy.RETAIN if retain else CachePolicy.DEFAULT,
                description=KEEP if retain else "scratch",
            )
            try:
                write(active, rng)
            except BaseException:
                active.release()
                raise
            if abandon and rng.random() < abandon:
                active.release()
                return
            self._finish(active.commit(), rng, retain)

    def build(self, rng: random.Random) -> None:
        """new, writes through a local mount, commit, maybe finalize and keep."""
        self._new_and_commit(rng, self._write_through_mount, abandon=0.2)

    def _write_through_mount(self, active: MutableRef, rng: random.Random) -> None:
        with active.mount(readonly=False) as target:
            for name, data in self._files(rng).items():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                (target / name).write_bytes(data)

    def apply(self, rng: random.Random) -> None:
        """new, apply of a layer tar through containerd's diff service, commit."""
        self._new_and_commit(rng, lambda active, r: active.apply(make_tar(self._files(r))))

    def lazy_chain(self, rng: random.Random) -> None:
        """get_by_blob of a chain of one to three blobs the provider serves; the records
        stay lazy unless extracted (then a retained chain is kept)."""
        retain = rng.random() < 0.5
        handlers: dict[str, DescHandler] = {}
        refs: list[ImmutableRef] = []
        try:
            parent: ImmutableRef | None = None
            for _ in range(rng.randrange(1, 4)):
                blob, desc = layer(self._files(rng), rng.choice([TAR_GZIP, TAR_ZSTD, TAR]))
                self.provider.add(blob)
                handlers[desc.digest] = DescHandler(self.provider)
                parent = self.cm.get_by_blob(
                    desc,
                    parent,
                    desc_handlers=handlers,
                    cache_policy=CachePolicy.RETAIN if retain else CachePolicy.DEFAULT,
                    description=KEEP if retain else "scratch",
                )
                refs.append(parent)
            assert parent is not None
            if rng.random() < 0.6:
                parent.extract()
                if retain:
                    self._keep(parent)
        finally:
            for ref in refs:
                ref.release()

    def remote(self, rng: random.Random) -> None:
        """get_remote of a kept record, sometimes forcing a conversion."""
        ref = self._kept_parent(rng)
        if ref is None:
            return
        with ref:
            remote = ref.get_remote(
                compression=rng.choice(
                    [Compression.GZIP, Compression.ZSTD, Compression.UNCOMPRESSED]
                ),
                force_compression=rng.random() < 0.5,
            )
            if rng.random() < 0.3:
                with remote.provider.open(remote.descriptors[-1]) as stream:
                    while stream.read(1 << 16):
                        pass

    def prune(self, rng: random.Random) -> None:
        policy = PrunePolicy(filters=[f"description!={KEEP}"], all=rng.random() < 0.5)
        self.cm.prune(policy)
        if rng.random() < 0.3:
            self.cm.disk_usage()


def report_retries(fault: Callable[[], None]) -> None:
    """Calls `fault` before each retry of a repeatable call; the retry policy is unchanged."""
    retrying = Transport.retrying

    def reporting(transport: Transport) -> Retrying:
        return retrying(transport).copy(before_sleep=lambda _: fault())

    Transport.retrying = reporting  # type: ignore[method-assign,assignment]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("namespace")
    parser.add_argument("state_dir")
    parser.add_argument("seed", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--tolerate-unavailable", action="store_true")
    args = parser.parse_args()

    printing = threading.Lock()

    def say(*words: object) -> None:
        """One whole line to the parent, whichever thread calls (retries come from the
        threads of parallel pulls too)."""
        with printing:
            print(*words, flush=True)

    def report(record_id: str, digest: str) -> None:
        say("keep", record_id, digest)

    def fault() -> None:
        say("fault")

    report_retries(fault)

    cm = Manager.open(
        args.address,
        namespace=args.namespace,
        state_dir=args.state_dir,
        snapshotter="overlayfs",
    )
    work = Workload(cm, report, tolerate_unavailable=args.tolerate_unavailable, fault=fault)
    rng = random.Random(args.seed)
    say("ready")
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        work.step(rng)
    with contextlib.suppress(UnavailableError):
        cm.close()
    say("done", work.steps, work.unavailable)


if __name__ == "__main__":
    main()
