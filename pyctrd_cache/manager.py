"""The cache manager (BuildKit's cache/manager.go); its code is in the cache core,
`pyctrd_cache.cache.manager`, and this module is its public import path."""

from __future__ import annotations

from .cache._usage import keep_bytes_for as keep_bytes_for
from .cache.manager import (
    DEFAULT_NAMESPACE as DEFAULT_NAMESPACE,
)
from .cache.manager import (
    OWNER_LABEL,
    Manager,
    default_state_dir,
)

__all__ = ["OWNER_LABEL", "Manager", "default_state_dir"]
