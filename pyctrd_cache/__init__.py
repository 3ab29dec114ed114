"""pyctrd-cache: BuildKit's layer cache manager in Python, on a real containerd.

The public names are re-exported here; the modules behind them are free to move.
"""

from __future__ import annotations

from .client.types import Descriptor, Mount
from .embedded import EmbeddedContainerd
from .errors import (
    AlreadyExistsError,
    CacheError,
    ContainerdError,
    FailedPreconditionError,
    InvalidError,
    LockedError,
    NeedsRemoteProvidersError,
    NoBlobsError,
    NotFoundError,
    UnavailableError,
    UnimplementedError,
)

__all__ = [
    "AlreadyExistsError",
    "CacheError",
    "ContainerdError",
    "Descriptor",
    "EmbeddedContainerd",
    "FailedPreconditionError",
    "InvalidError",
    "LockedError",
    "Mount",
    "NeedsRemoteProvidersError",
    "NoBlobsError",
    "NotFoundError",
    "UnavailableError",
    "UnimplementedError",
]
