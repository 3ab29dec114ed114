"""Every request the client builds is whole: containerd 1.7 and 2.x crash on some requests
whose embedded messages are missing, so the typed methods must never send one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.protobuf.message import Message

from pyctrd_cache.client import (
    ContentService,
    Descriptor,
    DiffService,
    ImagesService,
    IntrospectionService,
    LeaseResource,
    LeasesService,
    Mount,
    NamespacesService,
    SnapshotsService,
    VersionService,
)

# Timestamps are optional wherever they appear; containerd reads them only when set.
OPTIONAL_TYPES = {"google.protobuf.Timestamp"}


class RecordingTransport:
    """Stands in for the gRPC transport and keeps every request it is given."""

    retry_budget = 1.0

    def __init__(self) -> None:
        self.requests: list[Message] = []

    def unary(
        self, service: str, method: str, request: Message, response_type: Any, **_: Any
    ) -> Any:
        self.requests.append(request)
        return response_type()

    def collect(self, service: str, method: str, request: Message, response_type: Any) -> list[Any]:
        self.requests.append(request)
        return []

    def server_stream(
        self, service: str, method: str, request: Message, response_type: Any, **_: Any
    ) -> Iterator[Any]:
        self.requests.append(request)
        return iter(())


def missing_messages(message: Message, path: str = "") -> list[str]:
    missing = []
    for field in message.DESCRIPTOR.fields:
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        name = f"{path}{field.name}"
        value = getattr(message, field.name)
        # A repeated field's value is a container, not a message (in every protobuf runtime;
        # the descriptor's way of saying so changed between majors).
        if not isinstance(value, Message):
            for i, item in enumerate(value):
                missing += missing_messages(item, f"{name}[{i}].")
        elif not message.HasField(field.name):
            if field.message_type.full_name not in OPTIONAL_TYPES:
                missing.append(f"{message.DESCRIPTOR.full_name}.{field.name}")
        else:
            missing += missing_messages(value, f"{name}.")
    return missing


DESC = Descriptor("application/vnd.oci.image.layer.v1.tar", "sha256:" + "0" * 64, 1)
MOUNTS = [Mount("bind", "/src", ("rbind", "rw"))]

CALLS: dict[str, Callable[[Any], Any]] = {
    "snapshots.prepare": lambda t: SnapshotsService(t, "overlayfs").prepare("k", "p"),
    "snapshots.view": lambda t: SnapshotsService(t, "overlayfs").view("k", "p"),
    "snapshots.mounts": lambda t: SnapshotsService(t, "overlayfs").mounts("k"),
    "snapshots.commit": lambda t: SnapshotsService(t, "overlayfs").commit("n", "k"),
    "snapshots.remove": lambda t: SnapshotsService(t, "overlayfs").remove("k"),
    "snapshots.stat": lambda t: SnapshotsService(t, "overlayfs").stat("k"),
    "snapshots.update_labels": lambda t: SnapshotsService(t, "overlayfs").update_labels("k", {}),
    "snapshots.list": lambda t: SnapshotsService(t, "overlayfs").list(),
    "snapshots.usage": lambda t: SnapshotsService(t, "overlayfs").usage("k"),
    "content.info": lambda t: ContentService(t).info(DESC.digest),
    "content.update_labels": lambda t: ContentService(t).update_labels(DESC.digest, {}),
    "content.list": lambda t: ContentService(t).list(),
    "content.delete": lambda t: ContentService(t).delete(DESC.digest),
    "content.read": lambda t: list(ContentService(t).read(DESC.digest)),
    "content.status": lambda t: ContentService(t).status("r"),
    "content.list_statuses": lambda t: ContentService(t).list_statuses(),
    "content.abort": lambda t: ContentService(t).abort("r"),
    "leases.create": lambda t: LeasesService(t).create("l"),
    "leases.delete": lambda t: LeasesService(t).delete("l"),
    "leases.list": lambda t: LeasesService(t).list(),
    "leases.add_resource": lambda t: LeasesService(t).add_resource(
        "l", LeaseResource.content(DESC.digest)
    ),
    "leases.delete_resource": lambda t: LeasesService(t).delete_resource(
        "l", LeaseResource.content(DESC.digest)
    ),
    "leases.list_resources": lambda t: LeasesService(t).list_resources("l"),
    "diff.apply": lambda t: DiffService(t).apply(DESC, MOUNTS),
    "diff.diff": lambda t: DiffService(t).diff(MOUNTS, MOUNTS),
    "images.list": lambda t: ImagesService(t).list(),
    "images.create": lambda t: ImagesService(t).create("img", DESC),
    "images.delete": lambda t: ImagesService(t).delete("img"),
    "namespaces.create": lambda t: NamespacesService(t).create("ns"),
    "namespaces.list": lambda t: NamespacesService(t).list(),
    "namespaces.delete": lambda t: NamespacesService(t).delete("ns"),
    "version.get": lambda t: VersionService(t).get(),
    "introspection.plugins": lambda t: IntrospectionService(t).plugins(),
    "introspection.server": lambda t: IntrospectionService(t).server(),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_request_has_every_embedded_message(name: str) -> None:
    transport = RecordingTransport()
    CALLS[name](transport)
    assert transport.requests, f"{name} sent nothing"
    for request in transport.requests:
        assert missing_messages(request) == []


def test_the_check_finds_a_missing_embedded_message() -> None:
    from containerd_api.services.leases.v1 import leases_pb2

    assert missing_messages(leases_pb2.AddResourceRequest(id="l")) == [
        "containerd.services.leases.v1.AddResourceRequest.resource"
    ]
