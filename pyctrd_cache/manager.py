"""The cache manager (BuildKit's cache/manager.go); its code is in the cache core,
`pyctrd_cache.cache.manager`, and this module is its public import path."""

from __future__ import annotations

from .cache.manager import (
    DEFAULT_NAMESPACE as DEFAULT_NAMESPACE,
)
from .cache.manager import (
    OWNER_LABEL,
    Manager,
    default_state_dir,
)
from .cache.manager import (
    keep_bytes_for as keep_bytes_for,
)

__all__ = ["OWNER_LABEL", "Manager", "default_state_dir"]
