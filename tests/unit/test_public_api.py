"""The public API is a deliberate thing: pinned, documented, and versioned from one place."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pyctrd_cache
from tests import api_surface


def test_the_public_api_is_the_pinned_one() -> None:
    assert api_surface.surface() == api_surface.PINNED.read_text(), (
        "the public API changed; if that is deliberate, run `python -m tests.api_surface --write` "
        "and commit tests/unit/public_api.txt with the change"
    )


def test_every_public_name_and_member_has_a_docstring() -> None:
    assert api_surface.undocumented() == []


def test_all_names_exist_and_nothing_public_is_left_out() -> None:
    for name in pyctrd_cache.__all__:
        assert hasattr(pyctrd_cache, name), name
    imported = {
        name
        for name, value in vars(pyctrd_cache).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("pyctrd_cache.")
    }
    assert imported <= set(pyctrd_cache.__all__)


def test_the_version_comes_from_the_installed_metadata() -> None:
    installed = importlib.metadata.version("pyctrd-cache")
    assert pyctrd_cache.__version__ == installed
    for command in (
        [sys.executable, "-m", "pyctrd_cache", "--version"],
        [sys.executable, "-c", "from pyctrd_cache.cli import main; main()", "--version"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert (done.returncode, done.stdout) == (0, f"pyctrd-cache {installed}\n"), done.stderr


def test_python_m_runs_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pyctrd_cache", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout.startswith("usage: pyctrd-cache ")
