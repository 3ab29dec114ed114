"""The stargz snapshotter mode; its code, and the rules it follows, are in the cache core,
`pyctrd_cache.cache.remote_snapshots`, and this module is its public import path."""

from __future__ import annotations

from .cache.remote_snapshots import (
    REMOTE_SNAPSHOT_LABEL,
    STARGZ_SNAPSHOTTER,
    remote_snapshot_labels,
)

__all__ = ["REMOTE_SNAPSHOT_LABEL", "STARGZ_SNAPSHOTTER", "remote_snapshot_labels"]
