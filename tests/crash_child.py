"""A child process for the crash tests: runs new, commit, finalize and remove, and is killed
by SIGKILL at the crash point named in PYCTRD_CRASH_POINT (see pyctrd_cache/_faults.py).

Usage: python -m tests.crash_child ADDRESS NAMESPACE STATE_DIR

Prints `anchor <id>` once a retained, finalized record exists, and `mutable <id>` /
`immutable <id>` as it creates the records the crash may interrupt.
"""

from __future__ import annotations

import sys

from pyctrd_cache import CachePolicy, Manager


def main(address: str, namespace: str, state_dir: str) -> None:
    cm = Manager.open(address, namespace=namespace, state_dir=state_dir, snapshotter="overlayfs")
    base = cm.new(cache_policy=CachePolicy.RETAIN)
    with base.mount(readonly=False) as target:
        (target / "anchor").write_text("anchor")
    anchor = base.commit()
    anchor.finalize()
    print("anchor", anchor.id, flush=True)

    active = cm.new(anchor, cache_policy=CachePolicy.RETAIN)
    print("mutable", active.id, flush=True)
    with active.mount(readonly=False) as target:
        (target / "child").write_text("child")
    child = active.commit()
    print("immutable", child.id, flush=True)
    child.finalize()
    child.release()

    doomed = cm.new()
    print("doomed", doomed.id, flush=True)
    doomed.release()
    anchor.release()
    cm.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
