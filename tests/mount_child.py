"""A child process for the mount clean-up test: mounts a record and is killed by SIGKILL
with the mount open.

Usage: python -m tests.mount_child ADDRESS NAMESPACE STATE_DIR

Prints `record <id>` and `mounted <path>`.
"""

from __future__ import annotations

import os
import signal
import sys

from pyctrd_cache import CachePolicy, Manager


def main(address: str, namespace: str, state_dir: str) -> None:
    cm = Manager.open(address, namespace=namespace, state_dir=state_dir, snapshotter="overlayfs")
    work = cm.new(cache_policy=CachePolicy.RETAIN)
    print("record", work.id, flush=True)
    with work.mount(readonly=False) as target:
        (target / "written").write_text("before the kill")
        print("mounted", target, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(*sys.argv[1:4])
