"""A private containerd for tests, demos and machines without a system daemon."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Final

from .client import Client, VersionInfo
from .daemon_config import daemon_config, parse_version
from .errors import CacheError, InvalidError, UnavailableError

__all__ = ["EmbeddedContainerd"]

# sun_path holds 108 bytes with the final NUL, and containerd adds ".ttrpc" for its second socket.
_SOCKET_MAX: Final = 107 - len(".ttrpc")


def containerd_version(binary: str) -> tuple[int, int, int]:
    """The (major, minor, patch) that `binary --version` reports."""
    path = shutil.which(binary)
    if path is None:
        raise CacheError(f"containerd binary not found: {binary}")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    try:
        return parse_version(out.stdout)
    except ValueError:
        raise CacheError(
            f"{path} --version did not print a containerd version: {out.stderr.strip()}"
        ) from None


class EmbeddedContainerd:
    """Runs `binary` as a private daemon with root, state, socket and log in `root_dir`.

    `start` waits until the daemon answers; `stop` sends SIGTERM, then SIGKILL after
    `stop_timeout`. The daemon's log is kept in `log_path` and quoted in errors.
    `proxy_snapshotters` maps snapshotter names (`stargz`) to the Unix sockets of proxy
    snapshotters already listening.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        binary: str = "containerd",
        *,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        proxy_snapshotters: Mapping[str, str] | None = None,
    ) -> None:
        self.proxy_snapshotters = dict(proxy_snapshotters or {})
        self.root_dir = pathlib.Path(root_dir).absolute()
        self.binary = binary
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.address = str(self.root_dir / "containerd.sock")
        self.config_path = self.root_dir / "config.toml"
        self.log_path = self.root_dir / "containerd.log"
        self.version: VersionInfo | None = None
        self._process: subprocess.Popen[bytes] | None = None
        if len(self.address.encode()) > _SOCKET_MAX:
            raise InvalidError(
                f"socket path too long for a Unix socket ({len(self.address.encode())} bytes, "
                f"at most {_SOCKET_MAX}): {self.address}"
            )

    @property
    def pid(self) -> int | None:
        """The daemon's process id while it runs, else None."""
        return self._process.pid if self._process and self._process.poll() is None else None

    def start(self) -> EmbeddedContainerd:
        """Starts the daemon (a no-op while it runs) and waits until its socket answers."""
        if self.pid is not None:
            return self
        path = shutil.which(self.binary)
        if path is None:
            raise CacheError(f"containerd binary not found: {self.binary}")
        major = containerd_version(path)[0]
        try:
            self.root_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise CacheError(f"cannot create {self.root_dir}: {err.strerror}") from None
        self.config_path.write_text(
            daemon_config(
                root=str(self.root_dir / "root"),
                state=str(self.root_dir / "state"),
                address=self.address,
                major=major,
                proxy_snapshotters=self.proxy_snapshotters,
            )
        )
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [path, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        with Client(self.address, retry_budget=0.5, timeout=2.0) as client:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise CacheError(
                        f"containerd exited with status {self._process.returncode} while "
                        f"starting; its log {self.log_path} ends with:\n{self.log_tail()}"
                    )
                if os.path.exists(self.address):
                    try:
                        self.version = client.version.get()
                        return
                    except UnavailableError:
                        pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise UnavailableError(
                        f"containerd did not answer on {self.address} within "
                        f"{self.start_timeout:g}s; its log {self.log_path} ends with:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of the daemon's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL once `stop_timeout` has passed."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL at once, as a crash would."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._process = None

    def restart(self) -> None:
        """Stops the daemon gracefully and starts it again on the same root."""
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedContainerd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
