"""Value types of the cache's public API."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["CachePolicy", "PrunePolicy", "RecordStatus", "RecordType", "RefInfo", "UsageInfo"]


class CachePolicy(enum.Enum):
    """Whether releasing a mutable record removes it (DEFAULT) or keeps it (RETAIN).

    It does not protect a record from prune.
    """

    DEFAULT = 0
    RETAIN = 1


class RecordType(enum.StrEnum):
    """What a record holds, spelled as BuildKit spells it."""

    REGULAR = "regular"
    INTERNAL = "internal"
    FRONTEND = "frontend"
    LOCAL_SOURCE = "source.local"
    GIT_CHECKOUT = "source.git.checkout"
    CACHE_MOUNT = "exec.cachemount"


@dataclass(frozen=True)
class RefInfo:
    """A snapshot of one record's metadata."""

    id: str
    mutable: bool
    parent_id: str | None
    snapshot_id: str
    equal_mutable_id: str | None
    blob: str | None
    diff_id: str | None
    chain_id: str | None
    blob_chain_id: str | None
    media_type: str | None
    blob_size: int | None
    blob_only: bool
    size: int | None
    """Bytes used, or None while not yet computed."""
    description: str
    created_at: datetime | None
    last_used_at: datetime | None
    usage_count: int
    record_type: RecordType
    layer_type: str
    cache_policy: CachePolicy
    image_refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecordStatus:
    """A record's metadata and whether it is in use (a handle on it, or on a record built on
    it, is open)."""

    info: RefInfo
    in_use: bool


@dataclass(frozen=True)
class UsageInfo:
    """One record in a disk usage report or a prune result."""

    id: str
    mutable: bool
    in_use: bool
    size: int
    parents: tuple[str, ...]
    created_at: datetime | None
    last_used_at: datetime | None
    usage_count: int
    description: str
    record_type: RecordType
    shared: bool


@dataclass
class PrunePolicy:
    """What one prune pass may remove.

    Records in use, or with a record built on them, always stay. Without `all`, internal,
    frontend and shared records stay too. `filters` (containerd's filter syntax, several
    strings ORed) narrow the candidates; `keep_duration` keeps records used within it;
    `keep_bytes` removes the least recently used records only until the total fits.

    BuildKit's later free-space policy (bytes, 0 = unset), measured on the file system that
    holds containerd's snapshots: keep at most `max_used_space`; remove more while that file
    system has less than `min_free_space` free; never go below `reserved_space` (which
    `keep_bytes` joins when both are given).
    """

    filters: Sequence[str] = ()
    all: bool = False
    keep_duration: timedelta | None = None
    keep_bytes: int = 0
    reserved_space: int = 0
    max_used_space: int = 0
    min_free_space: int = 0
