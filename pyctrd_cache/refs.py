"""Cache records and the counted handles on them (BuildKit's cache/refs.go); their code is
in the cache core, `pyctrd_cache.cache.refs`, and this module is their public import path."""

from __future__ import annotations

from .cache.refs import ImmutableRef, MutableRef, Ref

__all__ = ["ImmutableRef", "MutableRef", "Ref"]
