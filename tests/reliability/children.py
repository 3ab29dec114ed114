"""The parent side of tests/reliability/workload.py: runs it as a child process and
collects what it reports."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import TracebackType

from tests.fix_containerd import ROOT, Daemon


class WorkloadChild:
    """A workload child process; `kept` maps each record it kept to its tree digest, and
    `faults` counts the calls it saw fail while containerd was unavailable (retried, or
    given up with `UnavailableError`). `module` is the child's module, which takes
    workload.py's arguments, then `extra`, and speaks its protocol."""

    def __init__(
        self,
        daemon: Daemon,
        namespace: str,
        state_dir: str,
        seed: int,
        seconds: float,
        *,
        tolerate_unavailable: bool = False,
        module: str = "tests.reliability.workload",
        extra: Sequence[str] = (),
    ) -> None:
        command = [
            sys.executable,
            "-m",
            module,
            daemon.address,
            namespace,
            state_dir,
            str(seed),
            str(seconds),
            *extra,
        ]
        if tolerate_unavailable:
            command.append("--tolerate-unavailable")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.kept: dict[str, str] = {}
        self.done: tuple[int, int] | None = None
        self.faults = 0
        self._stderr: str | None = None
        self._faulted = threading.Condition()
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not line.endswith("\n"):
                break  # cut off by the SIGKILL: only whole lines count
            word, *rest = line.split()
            if word == "ready":
                self._ready.set()
            elif word == "keep":
                self.kept[rest[0]] = rest[1]
            elif word == "fault":
                with self._faulted:
                    self.faults += 1
                    self._faulted.notify_all()
            elif word == "done":
                self.done = (int(rest[0]), int(rest[1]))
        self._ready.set()
        with self._faulted:
            self._faulted.notify_all()

    def wait_ready(self, timeout: float = 60) -> None:
        if not self._ready.wait(timeout) or self.process.poll() is not None:
            raise AssertionError(f"the workload did not start: {self.stderr()[-4000:]}")

    def wait_fault(self, seen: int, timeout: float) -> bool:
        """Whether the child reports a fault beyond the first `seen` within `timeout`."""
        with self._faulted:
            self._faulted.wait_for(
                lambda: self.faults > seen or self.process.poll() is not None, timeout
            )
            return self.faults > seen

    def kill(self) -> None:
        """SIGKILLs the child, which must die of it: a child that ended by itself (its
        workload failed) is an error carrying its stderr."""
        self.process.send_signal(signal.SIGKILL)
        code = self.wait(30)
        if code != -signal.SIGKILL:
            raise AssertionError(f"the workload ended by itself ({code}): {self.stderr()[-4000:]}")

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    def stderr(self) -> str:
        """Everything the child wrote to stderr, once it has exited ("" before)."""
        if self.process.poll() is None:
            return ""
        if self._stderr is None:
            assert self.process.stderr is not None
            self._stderr = self.process.stderr.read()
        return self._stderr

    def __enter__(self) -> WorkloadChild:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.wait(30)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
