"""Local mount points of `Ref.mount`, kept under the state directory.

Each mount point is a directory `STATE_DIR/mounts/<pid>-<start time>-<random>` named after
the process that made it (the start time tells a reused pid apart). A process killed while a
mount is open cannot unmount it; `Manager.open` unmounts and removes the mount points of
processes that are gone (`clean_stale`), so no overlay stays on the host pinning the
snapshots it shows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import subprocess
import tempfile

__all__ = ["clean_stale", "new_mount_point", "unmount"]

_log = logging.getLogger("pyctrd_cache")


def _start_time(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot; None when it is gone."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after the last
    # ')' start with field 3, and the start time is field 22.
    return stat.rsplit(")", 1)[1].split()[19]


def new_mount_point(mounts_dir: pathlib.Path) -> pathlib.Path:
    """A new empty directory for a mount, named after this process."""
    mounts_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pid = os.getpid()
    return pathlib.Path(tempfile.mkdtemp(prefix=f"{pid}-{_start_time(pid)}-", dir=mounts_dir))


def unmount(target: pathlib.Path) -> None:
    """Unmounts `target`; a busy mount is detached now and freed when its last user goes."""
    result = subprocess.run(["umount", str(target)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        subprocess.run(["umount", "--lazy", str(target)], capture_output=True, check=False)


def _owner_gone(name: str) -> bool:
    pid, _, rest = name.partition("-")
    start, _, _ = rest.partition("-")
    if not pid.isdigit():
        return False
    return _start_time(int(pid)) != start


def clean_stale(mounts_dir: pathlib.Path) -> list[pathlib.Path]:
    """Unmounts and removes the mount points whose process is gone; the ones removed.

    One that cannot be unmounted (no privilege) stays, logged at debug level.
    """
    removed: list[pathlib.Path] = []
    try:
        entries = list(mounts_dir.iterdir())
    except FileNotFoundError:
        return removed
    for path in entries:
        if not path.is_dir() or not _owner_gone(path.name):
            continue
        while count := _mounts_on(path):
            unmount(path)
            if _mounts_on(path) >= count:
                break
        try:
            path.rmdir()
        except OSError as err:
            _log.debug("cannot remove the stale mount point %s: %s", path, err)
            continue
        removed.append(path)
    return removed


def _mounts_on(path: pathlib.Path) -> int:
    """How many mounts are stacked on `path`."""
    target = os.fsencode(path)
    count = 0
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            if line.split()[4] == target:
                count += 1
    return count
