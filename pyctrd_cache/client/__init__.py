"""A thin, typed client for the containerd services the cache uses.

One class per service; every call carries the namespace header (and the lease header on a
client made by `with_lease`), has a deadline, and maps gRPC failures to the project's
errors. Calls that can be repeated without doubling their effect are retried while the
daemon is unavailable, within a bounded budget, then raise `UnavailableError`.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Final

from ..errors import InvalidError, NotFoundError, UnavailableError
from ._transport import Transport, normalize_address, validate_namespace
from .content import ContentReader, ContentService, ContentWriter
from .diff import DiffService
from .images import ImagesService
from .introspection import IntrospectionService, NamespacesService, VersionService
from .leases import LeasesService
from .snapshots import SnapshotsService
from .types import (
    ContentInfo,
    Descriptor,
    Image,
    IngestStatus,
    Lease,
    LeaseResource,
    Mount,
    Namespace,
    PluginInfo,
    ServerInfo,
    SnapshotInfo,
    SnapshotKind,
    Usage,
    VersionInfo,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "Client",
    "ContentInfo",
    "ContentReader",
    "ContentService",
    "ContentWriter",
    "Descriptor",
    "DiffService",
    "Image",
    "ImagesService",
    "IngestStatus",
    "IntrospectionService",
    "Lease",
    "LeaseResource",
    "LeasesService",
    "Mount",
    "Namespace",
    "NamespacesService",
    "PluginInfo",
    "ServerInfo",
    "SnapshotInfo",
    "SnapshotKind",
    "SnapshotsService",
    "Usage",
    "VersionInfo",
    "VersionService",
    "validate_namespace",
]

DEFAULT_ADDRESS: Final = "/run/containerd/containerd.sock"


class Client:
    """A connection to one containerd, scoped to one namespace.

    `timeout` bounds ordinary calls, `long_timeout` the ones that move layer data (content
    streams, diff and apply); `retry_budget` is how long repeatable calls keep retrying
    while the daemon is unavailable.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        namespace: str = "default",
        timeout: float = 30.0,
        long_timeout: float = 600.0,
        retry_budget: float = 10.0,
    ) -> None:
        self._t = Transport(
            normalize_address(address),
            namespace=namespace,
            timeout=timeout,
            long_timeout=long_timeout,
            retry_budget=retry_budget,
        )
        self._init_services()

    @classmethod
    def _from_transport(cls, transport: Transport) -> Client:
        client = cls.__new__(cls)
        client._t = transport
        client._init_services()
        return client

    def _init_services(self) -> None:
        self.content = ContentService(self._t)
        self.leases = LeasesService(self._t)
        self.diff = DiffService(self._t)
        self.images = ImagesService(self._t)
        self.version = VersionService(self._t)
        self.introspection = IntrospectionService(self._t)
        self.namespaces = NamespacesService(self._t)

    @property
    def address(self) -> str:
        """The daemon's socket path."""
        return self._t.socket_path

    @property
    def namespace(self) -> str:
        return self._t.namespace

    @property
    def lease(self) -> str:
        """The lease this client's calls attach objects to ("" for none)."""
        return self._t.lease

    def snapshots(self, snapshotter: str) -> SnapshotsService:
        return SnapshotsService(self._t, snapshotter)

    def with_lease(self, lease_id: str) -> Client:
        """A client on the same channel whose calls attach what they create to `lease_id`."""
        return Client._from_transport(self._t.with_lease(lease_id))

    def check(self, *, snapshotter: str | None = None) -> VersionInfo:
        """Fails fast, with one clear message, unless the daemon answers (and has `snapshotter`).

        Returns the daemon's version.
        """
        if not os.path.exists(self.address):
            raise UnavailableError(f"no containerd socket at {self.address}")
        version = self.version.get()
        if snapshotter is not None:
            plugins = {p.id: p for p in self.introspection.snapshotters()}
            plugin = plugins.get(snapshotter)
            if plugin is None:
                usable = ", ".join(sorted(p.id for p in plugins.values() if p.ok)) or "none"
                raise NotFoundError(
                    f"containerd at {self.address} has no snapshotter {snapshotter!r} "
                    f"(usable: {usable})"
                )
            if not plugin.ok:
                raise InvalidError(
                    f"snapshotter {snapshotter!r} of containerd at {self.address} failed to "
                    f"load: {plugin.init_error}"
                )
        return version

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
