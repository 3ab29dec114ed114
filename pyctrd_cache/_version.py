"""The installed distribution's version: pyproject.toml is its only source."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pyctrd-cache")
except PackageNotFoundError:  # imported from a source tree that no installer has seen
    __version__ = "0+unknown"
