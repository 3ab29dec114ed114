"""The Leases service: what keeps containerd's garbage collector away from objects."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from google.protobuf.empty_pb2 import Empty

from containerd_api.services.leases.v1 import leases_pb2 as pb

from ._transport import Transport, to_datetime
from .types import Lease, LeaseResource, frozen_labels

SERVICE = "containerd.services.leases.v1.Leases"
EXPIRE_LABEL = "containerd.io/gc.expire"
FLAT_LABEL = "containerd.io/gc.flat"


def _lease(lease: pb.Lease) -> Lease:
    return Lease(
        id=lease.id, created_at=to_datetime(lease.created_at), labels=frozen_labels(lease.labels)
    )


def _resource(r: LeaseResource) -> pb.Resource:
    return pb.Resource(id=r.id, type=r.type)


class LeasesService:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def create(
        self,
        lease_id: str = "",
        *,
        labels: Mapping[str, str] | None = None,
        expire: timedelta | None = None,
        flat: bool = False,
    ) -> Lease:
        """Creates a lease (containerd picks the id when `lease_id` is empty).

        `expire` makes the collector drop the lease after that long; `flat` keeps only the
        directly leased objects, not what their `gc.ref` labels point at.
        """
        all_labels = dict(labels or {})
        now = datetime.now(UTC)
        if expire is not None:
            all_labels[EXPIRE_LABEL] = (now + expire).isoformat().replace("+00:00", "Z")
        if flat:
            all_labels[FLAT_LABEL] = now.isoformat().replace("+00:00", "Z")
        req = pb.CreateRequest(id=lease_id, labels=all_labels)
        return _lease(
            self._t.unary(SERVICE, "Create", req, pb.CreateResponse, idempotent=False).lease
        )

    def delete(self, lease_id: str, *, sync: bool = False) -> None:
        """Deletes a lease; with `sync`, waits for the garbage collection that follows."""
        req = pb.DeleteRequest(id=lease_id, sync=sync)
        self._t.unary(
            SERVICE, "Delete", req, Empty, idempotent=True, missing_ok_on_retry=True, long=sync
        )

    def list(self, *filters: str) -> list[Lease]:
        req = pb.ListRequest(filters=list(filters))
        return [
            _lease(lease)
            for lease in self._t.unary(
                SERVICE, "List", req, pb.ListResponse, idempotent=True
            ).leases
        ]

    def add_resource(self, lease_id: str, resource: LeaseResource) -> None:
        req = pb.AddResourceRequest(id=lease_id, resource=_resource(resource))
        self._t.unary(SERVICE, "AddResource", req, Empty, idempotent=True)

    def delete_resource(self, lease_id: str, resource: LeaseResource) -> None:
        req = pb.DeleteResourceRequest(id=lease_id, resource=_resource(resource))
        self._t.unary(SERVICE, "DeleteResource", req, Empty, idempotent=True)

    def list_resources(self, lease_id: str) -> builtins.list[LeaseResource]:
        req = pb.ListResourcesRequest(id=lease_id)
        res = self._t.unary(
            SERVICE, "ListResources", req, pb.ListResourcesResponse, idempotent=True
        )
        return [LeaseResource(id=r.id, type=r.type) for r in res.resources]
