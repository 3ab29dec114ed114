"""Assertions the integration tests share, made with containerd's own listings."""

from __future__ import annotations

import pathlib
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import timedelta

from pyctrd_cache import Manager
from pyctrd_cache.client import Client
from pyctrd_cache.manager import OWNER_LABEL
from pyctrd_cache.metadata import DB_NAME
from tests.fix_containerd import ROOT, SNAPSHOTTER, Daemon, Managers


def check_disk_usage(cm: Manager, in_use: int, unused: int) -> None:
    du = cm.disk_usage()
    assert (sum(u.in_use for u in du), sum(not u.in_use for u in du)) == (in_use, unused), du


def snapshot_names(client: Client) -> list[str]:
    return sorted(s.name for s in client.snapshots(SNAPSHOTTER).list())


def owned_leases(client: Client, cm: Manager) -> list[str]:
    return sorted(x.id for x in client.leases.list(f'labels."{OWNER_LABEL}"=={cm.manager_id}'))


def blob_count(client: Client) -> int:
    return len(client.content.list())


def gc(client: Client) -> None:
    """Runs containerd's garbage collector and waits for it."""
    lease = client.leases.create(f"gc-{uuid.uuid4().hex}")
    client.leases.delete(lease.id, sync=True)


def run_killed_child(
    module: str, daemon: Daemon, managers: Managers, env: Mapping[str, str] | None = None
) -> str:
    """Runs `python -m MODULE ADDRESS NAMESPACE STATE_DIR`, a child that must end killed by
    SIGKILL (its own crash point); returns what it printed."""
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            module,
            daemon.address,
            managers.namespace,
            str(managers.state_dir),
        ],
        cwd=ROOT,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    return child.stdout


def back_date(state_dir: pathlib.Path, record_id: str, ago: timedelta) -> None:
    """Sets the last use of a record `ago` back, in the metadata store under `state_dir`
    (no manager may have it open)."""
    when = time.time_ns() - int(ago.total_seconds() * 10**9)
    with sqlite3.connect(state_dir / DB_NAME) as db:
        updated = db.execute(
            "UPDATE records SET last_used_at = ? WHERE id = ?", (when, record_id)
        ).rowcount
    db.close()
    assert updated == 1, record_id
