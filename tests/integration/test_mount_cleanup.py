"""A process killed with a mount open leaves it; the next `Manager.open` on the state
directory unmounts and removes it (issue 15; BuildKit's TestSharableMountPoolCleanup)."""

from __future__ import annotations

import os
import pathlib

from pyctrd_cache import mountpoints
from tests.checks import run_killed_child
from tests.fix_containerd import Daemon, Managers


def _mounted(path: pathlib.Path) -> bool:
    target = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


def test_open_cleans_the_mounts_of_a_killed_process(daemon: Daemon, managers: Managers) -> None:
    out = run_killed_child("tests.mount_child", daemon, managers)
    printed = dict(line.split(" ", 1) for line in out.splitlines())
    left = pathlib.Path(printed["mounted"])
    assert _mounted(left)
    assert left.is_relative_to(managers.state_dir)

    cm = managers.open()
    assert not _mounted(left)
    assert not left.exists()
    with cm.get_mutable(printed["record"]) as work, work.mount() as root:
        assert (root / "written").read_text() == "before the kill"
        # The mount points of a live process are left alone.
        assert mountpoints.clean_stale(cm.mounts_dir) == []
        assert _mounted(root)
    assert list(cm.mounts_dir.iterdir()) == []
