"""The child process of test_multiprocess.py: workload.py's mixed workload, in threads, on a
manager whose state directory other processes have open at the same time, with operations
that cross from one process to another.

Run as `python -m tests.reliability.multiproc ADDRESS NAMESPACE STATE_DIR SEED SECONDS
--shared DIR [--threads N] [--role mixed|pruner|holder] [--pool-seed S]`. Besides
workload.py's operations:

- parents, and the records `get_remote` converts and reads, are drawn from every process's
  kept records (`DIR/kept`, one `<id> <digest>` line appended per kept record, by whichever
  process kept it), half the time from the first four, so that processes build on, convert
  and read the same records at once;
- `shared_lazy`: `get_by_blob` of chains drawn from a pool of layer blobs that every process
  makes alike from the pool seed, so that several processes reuse, pull, extract and convert
  one lazy blob at once; an extracted chain must hold exactly the pool's files;
- `hold`: a finalized scratch record, which other processes' prunes select, held and
  mounted for up to a second, then checked to mount again with the tree it had.

The role weighs the operations: `pruner` prunes most, `holder` never prunes. Every process
prints `ready`, waits for `DIR/go` so that all start at once, prints `keep <id> <digest>`
for each record it keeps, and, when its time is up, `done <steps> <errors>`; an error's
traceback goes to stderr and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

from pyctrd_cache import Compression, DescHandler, ImmutableRef, Manager
from pyctrd_cache.client import Descriptor
from tests.layers import TAR, TAR_GZIP, TAR_ZSTD, BytesProvider, layer
from tests.reliability.workload import Workload, ref_digest, tree_digest

POOL_SIZE = 8
GO = "go"
KEPT = "kept"


def pool_layers(seed: int) -> list[tuple[dict[str, bytes], bytes, Descriptor]]:
    """The shared pool: each layer's files, blob and descriptor, the same in every process
    given the same seed (gzip and zstd compress deterministically)."""
    rng = random.Random(seed)
    out = []
    for i in range(POOL_SIZE):
        files = {
            f"p{i}/f{rng.randrange(100)}": rng.randbytes(rng.randrange(1, 40_000))
            for _ in range(rng.randrange(1, 4))
        }
        blob, desc = layer(files, (TAR_GZIP, TAR_ZSTD, TAR)[i % 3])
        out.append((files, blob, desc))
    return out


def regular_files(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink()
    }


class SharedWorkload(Workload):
    """workload.py's operations, plus those that meet other processes' records."""

    def __init__(
        self,
        cm: Manager,
        report: Callable[[str, str], None],
        shared: pathlib.Path,
        pool_seed: int,
        role: str,
    ) -> None:
        super().__init__(cm, report)
        self.kept_file = shared / KEPT
        self.pool = pool_layers(pool_seed)
        self.pool_provider = BytesProvider(*(blob for _, blob, _ in self.pool))
        self.ops: Sequence[Callable[[random.Random], None]] = {
            "mixed": [
                self.build,
                self.apply,
                self.lazy_chain,
                self.shared_lazy,
                self.shared_lazy,
                self.remote,
                self.remote,
                self.hold,
                self.prune,
            ],
            "pruner": [self.build, self.shared_lazy, self.remote, self.prune, self.prune],
            "holder": [self.build, self.apply, self.shared_lazy, self.remote, self.hold, self.hold],
        }[role]

    def all_kept(self) -> list[str]:
        """Every process's kept records, in the order they were kept."""
        try:
            text = self.kept_file.read_text()
        except FileNotFoundError:
            return []
        # Whole lines only: another process may be appending one.
        return [line.split()[0] for line in text.split("\n")[:-1]]

    def _kept_parent(self, rng: random.Random) -> ImmutableRef | None:
        choices = self.all_kept()
        if not choices or rng.random() < 0.3:
            return None
        return self.cm.get(rng.choice(choices[:4] if rng.random() < 0.5 else choices))

    def step(self, rng: random.Random) -> None:
        rng.choice(self.ops)(rng)
        with self._mu:
            self.steps += 1

    def shared_lazy(self, rng: random.Random) -> None:
        """get_by_blob of one to three pool layers in a row; then extract (and compare the
        tree with the pool's files), or get_remote (pulls, maybe converts), or nothing;
        sometimes held a while first, so that other processes' prunes meet it in use."""
        start = rng.randrange(POOL_SIZE)
        chain = [self.pool[(start + i) % POOL_SIZE] for i in range(rng.randrange(1, 4))]
        handlers = {desc.digest: DescHandler(self.pool_provider) for _, _, desc in self.pool}
        refs: list[ImmutableRef] = []
        try:
            for _, _, desc in chain:
                refs.append(
                    self.cm.get_by_blob(
                        desc,
                        refs[-1] if refs else None,
                        desc_handlers=handlers,
                        description="shared",
                    )
                )
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.0, 0.3))
            what = rng.random()
            if what < 0.4:
                refs[-1].extract()
                want: dict[str, bytes] = {}
                for files, _, _ in chain:
                    want.update(files)
                with refs[-1].mount() as root:
                    got = regular_files(root)
                if got != want:
                    raise AssertionError(
                        f"shared chain {refs[-1].id} extracted to {sorted(got)}, "
                        f"not the pool's {sorted(want)}"
                    )
            elif what < 0.8:
                refs[-1].get_remote(
                    compression=rng.choice(
                        [Compression.GZIP, Compression.ZSTD, Compression.UNCOMPRESSED]
                    ),
                    force_compression=rng.random() < 0.5,
                )
        finally:
            for ref in refs:
                ref.release()

    def hold(self, rng: random.Random) -> None:
        """A finalized scratch record (another process's prune selects it once released),
        held and mounted for up to a second, then checked to mount again with the tree it
        had."""
        parent = self._kept_parent(rng)
        with parent if parent is not None else contextlib.nullcontext():
            active = self.cm.new(parent, description="held")
            try:
                self._write_through_mount(active, rng)
            except BaseException:
                active.release()
                raise
            held = active.commit()
        with held:
            held.finalize()
            with held.mount() as root:  # mounted while others prune (and maybe killed so)
                before = tree_digest(root)
                time.sleep(rng.uniform(0.1, 1.0))
                during = tree_digest(root)
            # A fresh mount: the snapshot must still be there.
            if not before == during == (after := ref_digest(held)):
                raise AssertionError(
                    f"held record {held.id} changed: {before} -> {during} -> {after}"
                )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("namespace")
    parser.add_argument("state_dir")
    parser.add_argument("seed", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--shared", type=pathlib.Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--role", choices=["mixed", "pruner", "holder"], default="mixed")
    parser.add_argument("--pool-seed", type=int, default=0)
    args = parser.parse_args()

    printing = threading.Lock()

    def say(*words: object) -> None:
        with printing:
            print(*words, flush=True)

    kept_fd = os.open(args.shared / KEPT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def report(record_id: str, digest: str) -> None:
        say("keep", record_id, digest)
        # One short write with O_APPEND: whole lines, whatever other processes append.
        os.write(kept_fd, f"{record_id} {digest}\n".encode())

    cm = Manager.open(
        args.address, namespace=args.namespace, state_dir=args.state_dir, snapshotter="overlayfs"
    )
    work = SharedWorkload(cm, report, args.shared, args.pool_seed, args.role)
    errors: list[int] = []
    say("ready")
    while not (args.shared / GO).exists():
        time.sleep(0.01)
    deadline = time.monotonic() + args.seconds

    def run(index: int) -> None:
        rng = random.Random(f"{args.seed}-{index}")
        while time.monotonic() < deadline:
            try:
                work.step(rng)
            except Exception:
                with printing:
                    errors.append(index)
                    traceback.print_exc()
                    sys.stderr.flush()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cm.close()
    say("done", work.steps, len(errors))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
