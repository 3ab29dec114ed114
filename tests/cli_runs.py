"""Runs of the `pyctrd-cache` command for the tests, and the checks of its one-line errors."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

from tests.fix_containerd import Daemon


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyctrd_cache.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line_error(out: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("pyctrd-cache: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


class Cli:
    """Runs `pyctrd-cache` on the test's daemon, namespace and state directory."""

    def __init__(self, daemon: Daemon, namespace: str, state: pathlib.Path) -> None:
        self.daemon = daemon
        self.namespace = namespace
        self.state = state

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The command with `--progress quiet`: its stderr holds errors only."""
        return run(
            "--address",
            self.daemon.address,
            "--namespace",
            self.namespace,
            "--state-dir",
            str(self.state),
            "--progress",
            "quiet",
            *args,
        )

    def ok(self, *args: str) -> str:
        out = self(*args)
        assert out.returncode == 0, out.stderr
        assert out.stderr == "", out.stderr
        return out.stdout

    def json(self, *args: str) -> Any:
        """The command's JSON document, less the `daemon` object, which is checked to name
        the test's daemon."""
        document = json.loads(self.ok(*args, "--format", "json"))
        self.check_daemon(document.pop("daemon"))
        return document

    def check_daemon(self, daemon: Any) -> None:
        assert daemon["address"] == self.daemon.address
        assert daemon["embedded"] is False
        assert ".".join(map(str, self.daemon.version)) in daemon["version"]
