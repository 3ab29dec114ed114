"""The `pyctrd-cache` command as a real subprocess against real daemons."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from tests.fix_containerd import Daemon


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyctrd_cache.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_info_prints_version_and_snapshotters(daemon: Daemon, namespace: str) -> None:
    out = run("--address", daemon.address, "--namespace", namespace, "info", "--format", "json")
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout)
    assert document["version"].startswith("{}.{}.{}".format(*daemon.version))
    assert "overlayfs" in document["snapshotters"]
    assert document["embedded"] is False


def _one_line_error(out: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("pyctrd-cache: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_wrong_socket_path_is_one_line(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "nothing.sock")
    _one_line_error(run("--address", missing, "info"), "no containerd socket at", missing)


def test_missing_snapshotter_is_one_line(daemon: Daemon, namespace: str) -> None:
    out = run(
        "--address", daemon.address, "--namespace", namespace, "--snapshotter", "nosuch", "info"
    )
    _one_line_error(out, "no snapshotter 'nosuch'", "overlayfs")


def test_invalid_namespace_is_one_line(daemon: Daemon) -> None:
    out = run("--address", daemon.address, "--namespace", "no/slashes", "info")
    _one_line_error(out, "invalid containerd namespace 'no/slashes'")


def test_embedded_daemon_is_started_and_stopped(daemon: Daemon, tmp_path: pathlib.Path) -> None:
    binary = daemon.restartable().binary
    state = tmp_path / "state"
    out = run("--embedded", "--containerd-binary", binary, "--state-dir", str(state), "info")
    assert out.returncode == 0, out.stderr
    assert f"at {state}/containerd/containerd.sock" in out.stdout
    assert "starting a private containerd" in out.stderr
    # It was stopped when the command ended.
    probe = run("--address", str(state / "containerd" / "containerd.sock"), "info")
    assert probe.returncode == 1


def test_usage_error_exits_2() -> None:
    out = run("no-such-command")
    assert out.returncode == 2
