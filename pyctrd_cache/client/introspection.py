"""The Version, Introspection and Namespaces services."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.empty_pb2 import Empty

from containerd_api.services.introspection.v1 import introspection_pb2 as ipb
from containerd_api.services.namespaces.v1 import namespace_pb2 as npb
from containerd_api.services.version.v1 import version_pb2 as vpb

from ._transport import Transport
from .types import Namespace, PluginInfo, ServerInfo, VersionInfo, frozen_labels

VERSION = "containerd.services.version.v1.Version"
INTROSPECTION = "containerd.services.introspection.v1.Introspection"
NAMESPACES = "containerd.services.namespaces.v1.Namespaces"
SNAPSHOTTER_PLUGIN = "io.containerd.snapshotter.v1"


class VersionService:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def get(self) -> VersionInfo:
        res = self._t.unary(VERSION, "Version", Empty(), vpb.VersionResponse, idempotent=True)
        return VersionInfo(version=res.version, revision=res.revision)


class IntrospectionService:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def plugins(self, *filters: str) -> list[PluginInfo]:
        """Loaded plugins matching any of `filters` (`type==...`, `id==...`), or all."""
        req = ipb.PluginsRequest(filters=list(filters))
        res = self._t.unary(INTROSPECTION, "Plugins", req, ipb.PluginsResponse, idempotent=True)
        return [
            PluginInfo(
                type=p.type,
                id=p.id,
                requires=tuple(p.requires),
                exports=frozen_labels(p.exports),
                capabilities=tuple(p.capabilities),
                init_error=(p.init_err.message or "failed to load")
                if p.HasField("init_err")
                else None,
            )
            for p in res.plugins
        ]

    def snapshotters(self) -> list[PluginInfo]:
        return self.plugins(f"type=={SNAPSHOTTER_PLUGIN}")

    def server(self) -> ServerInfo:
        res = self._t.unary(INTROSPECTION, "Server", Empty(), ipb.ServerResponse, idempotent=True)
        return ServerInfo(uuid=res.uuid, pid=res.pid, pidns=res.pidns)


class NamespacesService:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def list(self) -> list[Namespace]:
        res = self._t.unary(
            NAMESPACES,
            "List",
            npb.ListNamespacesRequest(),
            npb.ListNamespacesResponse,
            idempotent=True,
        )
        return [Namespace(n.name, frozen_labels(n.labels)) for n in res.namespaces]

    def create(self, name: str, *, labels: Mapping[str, str] | None = None) -> Namespace:
        req = npb.CreateNamespaceRequest(
            namespace=npb.Namespace(name=name, labels=dict(labels or {}))
        )
        res = self._t.unary(
            NAMESPACES, "Create", req, npb.CreateNamespaceResponse, idempotent=False
        )
        return Namespace(res.namespace.name, frozen_labels(res.namespace.labels))

    def delete(self, name: str) -> None:
        """Deletes an empty namespace (leases and ingests go with it)."""
        req = npb.DeleteNamespaceRequest(name=name)
        self._t.unary(NAMESPACES, "Delete", req, Empty, idempotent=True, missing_ok_on_retry=True)
