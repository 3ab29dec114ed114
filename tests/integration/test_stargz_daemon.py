"""The stargz snapshotter daemon the tests build (tests/stargz): it compiles, starts, and a
containerd configured with it as a proxy snapshotter lists it and serves snapshots through it.
When it cannot be built the test fails, saying why."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from pyctrd_cache.client import Client
from pyctrd_cache.daemon_config import daemon_config
from pyctrd_cache.embedded import containerd_version
from pyctrd_cache.errors import UnavailableError
from tests.fix_containerd import INSTALLED, ROOT, Daemon

BUILD = ROOT / "tests" / "stargz" / "build"
STARGZ = "stargz"
ROOT_LABEL = {"containerd.io/gc.root": "1"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the snapshotter needs root")


def _tail(path: pathlib.Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _wait_for(path: pathlib.Path, process: subprocess.Popen[bytes], log: pathlib.Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"{process.args!r} exited with {process.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{process.args!r} made no socket {path} in 30 s:\n{_tail(log)}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def stargz_binary() -> str:
    """The proxy-snapshotter daemon, built (or taken from its cache) by tests/stargz/build."""
    try:
        result = subprocess.run(
            [str(BUILD)], capture_output=True, text=True, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"cannot build the stargz snapshotter daemon with {BUILD}: {e}")
    binary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0 or not os.access(binary, os.X_OK):
        pytest.fail(
            f"cannot build the stargz snapshotter daemon with {BUILD} (it needs Go 1.19 and "
            f"Debian's golang-github-containerd-stargz-snapshotter-dev); exit status "
            f"{result.returncode}:\n{result.stderr[-3000:]}"
        )
    return binary


@pytest.fixture
def stargz_containerd(daemon: Daemon, stargz_binary: str) -> Iterator[str]:
    """The address of a containerd (the version under test) with the stargz snapshotter as
    proxy plugin `stargz`; both daemons stop afterwards."""
    binary = (
        daemon.embedded.binary if daemon.embedded is not None else str(INSTALLED / "containerd-2.1")
    )
    path = shutil.which(binary)
    assert path is not None
    root = pathlib.Path(tempfile.mkdtemp(prefix="sgz-", dir="/tmp"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        snapshotter_socket = root / "stargz.sock"
        snapshotter_log = root / "stargz.log"
        with open(snapshotter_log, "ab") as log:
            processes.append(
                subprocess.Popen(
                    [
                        stargz_binary,
                        "-address",
                        str(snapshotter_socket),
                        "-root",
                        str(root / "stargz"),
                        "-no-background-fetch",
                        "-plain-http",
                        "127.0.0.1:5000",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        _wait_for(snapshotter_socket, processes[0], snapshotter_log)

        address = root / "containerd.sock"
        config = root / "config.toml"
        config.write_text(
            daemon_config(
                root=str(root / "root"),
                state=str(root / "state"),
                address=str(address),
                major=containerd_version(path)[0],
                proxy_snapshotters={STARGZ: str(snapshotter_socket)},
            )
        )
        containerd_log = root / "containerd.log"
        with open(containerd_log, "ab") as log:
            processes.append(
                subprocess.Popen(
                    [path, "--config", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        _wait_for(address, processes[1], containerd_log)
        with Client(str(address), retry_budget=10.0) as client:
            try:
                client.version.get()
            except UnavailableError as e:
                pytest.fail(f"containerd did not answer: {e}\n{_tail(containerd_log)}")
        yield str(address)
    finally:
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(root, ignore_errors=True)


def test_containerd_lists_and_uses_the_stargz_snapshotter(
    daemon: Daemon, stargz_containerd: str
) -> None:
    assert daemon.ctr is not None
    plugins = subprocess.run(
        [daemon.ctr, "-a", stargz_containerd, "plugins", "ls"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    rows = [line.split() for line in plugins.splitlines()]
    assert ["io.containerd.snapshotter.v1", STARGZ, "ok"] in [r[:2] + r[-1:] for r in rows], plugins

    # The snapshotter answers through containerd: an active snapshot is prepared, committed,
    # listed and removed (labelled as roots, so that containerd's collector leaves them).
    with Client(stargz_containerd, namespace="stargz-check") as client:
        snapshots = client.snapshots(STARGZ)
        mounts = snapshots.prepare("active", "", labels=ROOT_LABEL)
        assert mounts
        snapshots.commit("committed", "active", labels=ROOT_LABEL)
        assert [s.name for s in snapshots.list()] == ["committed"]
        snapshots.remove("committed")
        assert snapshots.list() == []
        client.namespaces.delete("stargz-check")
