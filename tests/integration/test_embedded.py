"""`EmbeddedContainerd.restart` and `log_tail`, and the `containerd` command that runs an
embedded daemon in the foreground, each on a private daemon of the binary under test."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from pyctrd_cache import CacheError, EmbeddedContainerd, UnavailableError
from pyctrd_cache.client import Client
from tests.fix_containerd import Daemon
from tests.layers import digest_of


@pytest.fixture
def root_dir() -> Iterator[pathlib.Path]:
    # Short: the socket lives inside and Unix socket paths are limited to 107 bytes.
    path = pathlib.Path(tempfile.mkdtemp(prefix="ctrd-e-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def answers(address: str) -> bool:
    with Client(address, retry_budget=0.0, timeout=2.0) as client:
        try:
            client.version.get()
        except UnavailableError:
            return False
    return True


def test_restart_is_a_new_process_on_the_same_root(daemon: Daemon, root_dir: pathlib.Path) -> None:
    own = EmbeddedContainerd(root_dir, daemon.restartable().binary).start()
    try:
        data = b"kept across the restart"
        with Client(own.address, namespace="restart") as client:
            lease = client.leases.create("holder")
            client.with_lease(lease.id).content.write(
                "ref-restart", data, expected=digest_of(data), size=len(data)
            )
        before = own.pid
        assert before is not None
        own.restart()
        assert own.pid not in (None, before)
        with pytest.raises(ProcessLookupError):
            os.kill(before, 0)
        assert own.version is not None
        with Client(own.address, namespace="restart") as client:
            assert client.version.get().version == own.version.version
            assert b"".join(client.content.read(digest_of(data))) == data
            client.leases.delete("holder", sync=True)
            client.namespaces.delete("restart")
    finally:
        own.stop()
    assert own.pid is None
    assert not answers(own.address)


def test_log_tail_is_the_end_of_the_log(daemon: Daemon, root_dir: pathlib.Path) -> None:
    own = EmbeddedContainerd(root_dir, daemon.restartable().binary)
    assert own.log_tail() == ""  # no log yet
    own.start()
    own.stop()
    lines = own.log_path.read_text().splitlines()
    assert len(lines) > 5
    assert own.log_tail(5) == "\n".join(lines[-5:])
    assert own.log_tail(len(lines) + 10) == "\n".join(lines)


def test_a_daemon_that_cannot_start_is_reported_with_its_log(
    daemon: Daemon, root_dir: pathlib.Path
) -> None:
    # Its root is a file: containerd exits at once.
    (root_dir / "root").write_text("not a directory")
    own = EmbeddedContainerd(root_dir, daemon.restartable().binary)
    with pytest.raises(CacheError, match="containerd exited with status") as info:
        own.start()
    tail = own.log_tail()
    assert tail
    assert tail in str(info.value)
    assert str(own.log_path) in str(info.value)


def _daemon_pid(config: pathlib.Path) -> int:
    """The containerd process running with `config`."""
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in argv and b"--config" in argv:
            return int(entry.name)
    raise AssertionError(f"no containerd runs with {config}")


def _run_containerd_command(binary: str, state: pathlib.Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyctrd_cache.cli",
            "--state-dir",
            str(state),
            "--containerd-binary",
            binary,
            "containerd",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _end(process: subprocess.Popen[str]) -> None:
    """Ends a command still running: SIGTERM, on which it stops its daemon, then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _listening(process: subprocess.Popen[str], daemon: Daemon, state: pathlib.Path) -> str:
    """Reads the command's two lines (the address, the log) and returns the address."""
    assert process.stdout is not None
    first, second = process.stdout.readline(), process.stdout.readline()
    version = "{}.{}.{}".format(*daemon.version)
    assert first.startswith(f"containerd {version}"), first
    words = first.split()
    assert words[2:4] == ["listening", "on"], first
    assert second.startswith(f"log: {state / 'containerd' / 'containerd.log'};"), second
    return words[4]


def test_containerd_command_serves_until_interrupted(
    daemon: Daemon, root_dir: pathlib.Path
) -> None:
    state = root_dir / "s"
    with _run_containerd_command(daemon.restartable().binary, state) as process:
        try:
            address = _listening(process, daemon, state)
            assert address == str(state / "containerd" / "containerd.sock")
            assert answers(address)
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=60)
        finally:
            _end(process)
    assert (process.returncode, stdout) == (0, ""), stderr
    # The daemon went with it.
    assert not answers(address)


def test_containerd_command_fails_when_its_daemon_dies(
    daemon: Daemon, root_dir: pathlib.Path
) -> None:
    state = root_dir / "s"
    with _run_containerd_command(daemon.restartable().binary, state) as process:
        try:
            _listening(process, daemon, state)
            os.kill(_daemon_pid(state / "containerd" / "config.toml"), signal.SIGKILL)
            _, stderr = process.communicate(timeout=60)
        finally:
            _end(process)
    assert process.returncode == 1
    assert stderr.startswith("pyctrd-cache: error: containerd exited; its log "), stderr
    assert str(state / "containerd" / "containerd.log") in stderr
