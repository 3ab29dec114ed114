"""pyctrd-cache: BuildKit's layer cache manager in Python, on a real containerd.

The public names are re-exported here; the modules behind them are free to move.
"""

from __future__ import annotations

from ._version import __version__
from .client.types import Descriptor, Mount
from .compression import Compression
from .embedded import EmbeddedContainerd
from .errors import (
    AlreadyExistsError,
    AuthError,
    CacheError,
    ContainerdError,
    FailedPreconditionError,
    InvalidError,
    LockedError,
    NeedsRemoteProvidersError,
    NoBlobsError,
    NoSpaceError,
    NotFoundError,
    StoreDamagedError,
    UnavailableError,
    UnimplementedError,
)
from .manager import Manager
from .oci import export_layout, import_path, pull_layout
from .refs import ImmutableRef, MutableRef, Ref
from .registry import Credentials, RegistryProvider, pull, push
from .remote import DescHandler, OCILayoutProvider, ProgressEvent, Provider, Remote
from .remote_snapshots import remote_snapshot_labels
from .types import CachePolicy, PrunePolicy, RecordStatus, RecordType, RefInfo, UsageInfo

__all__ = [
    "AlreadyExistsError",
    "AuthError",
    "CacheError",
    "CachePolicy",
    "Compression",
    "ContainerdError",
    "Credentials",
    "DescHandler",
    "Descriptor",
    "EmbeddedContainerd",
    "FailedPreconditionError",
    "ImmutableRef",
    "InvalidError",
    "LockedError",
    "Manager",
    "Mount",
    "MutableRef",
    "NeedsRemoteProvidersError",
    "NoBlobsError",
    "NoSpaceError",
    "NotFoundError",
    "OCILayoutProvider",
    "ProgressEvent",
    "Provider",
    "PrunePolicy",
    "RecordStatus",
    "RecordType",
    "Ref",
    "RefInfo",
    "RegistryProvider",
    "Remote",
    "StoreDamagedError",
    "UnavailableError",
    "UnimplementedError",
    "UsageInfo",
    "__version__",
    "export_layout",
    "import_path",
    "pull",
    "pull_layout",
    "push",
    "remote_snapshot_labels",
]
