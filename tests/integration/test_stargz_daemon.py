"""The stargz snapshotter daemon the tests build (tests/stargz): it compiles, starts, and a
containerd configured with it as a proxy snapshotter lists it and serves snapshots through it.
When it cannot be built the test fails, saying why."""

from __future__ import annotations

import os
import subprocess

import pytest

from pyctrd_cache.client import Client
from tests.fix_containerd import Daemon
from tests.stargz_fix import STARGZ, StargzDaemon

ROOT_LABEL = {"containerd.io/gc.root": "1"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the snapshotter needs root")


def test_containerd_lists_and_uses_the_stargz_snapshotter(
    daemon: Daemon, stargz_containerd: StargzDaemon
) -> None:
    assert daemon.ctr is not None
    plugins = subprocess.run(
        [daemon.ctr, "-a", stargz_containerd.address, "plugins", "ls"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    rows = [line.split() for line in plugins.splitlines()]
    assert ["io.containerd.snapshotter.v1", STARGZ, "ok"] in [r[:2] + r[-1:] for r in rows], plugins

    # The snapshotter answers through containerd: an active snapshot is prepared, committed,
    # listed and removed (labelled as roots, so that containerd's collector leaves them).
    with Client(stargz_containerd.address, namespace="stargz-check") as client:
        snapshots = client.snapshots(STARGZ)
        mounts = snapshots.prepare("active", "", labels=ROOT_LABEL)
        assert mounts
        snapshots.commit("committed", "active", labels=ROOT_LABEL)
        assert [s.name for s in snapshots.list()] == ["committed"]
        snapshots.remove("committed")
        assert snapshots.list() == []
        client.namespaces.delete("stargz-check")
