"""Conversions between the client's typed values and containerd's protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from containerd_api.types import descriptor_pb2, mount_pb2

from .types import Descriptor, Mount


def mount_from_pb(m: mount_pb2.Mount) -> Mount:
    return Mount(type=m.type, source=m.source, options=tuple(m.options), target=m.target)


def mounts_from_pb(mounts: Iterable[mount_pb2.Mount]) -> list[Mount]:
    return [mount_from_pb(m) for m in mounts]


def mounts_to_pb(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in mounts
    ]


def descriptor_from_pb(d: descriptor_pb2.Descriptor) -> Descriptor:
    return Descriptor(
        media_type=d.media_type, digest=d.digest, size=d.size, annotations=dict(d.annotations)
    )


def descriptor_to_pb(d: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=d.media_type, digest=d.digest, size=d.size, annotations=dict(d.annotations)
    )


def label_paths(labels: Mapping[str, str], fields: Iterable[str] | None) -> list[str]:
    """Field-mask paths for a label update: the given label keys, else every key of `labels`.

    A key that is absent from `labels`, or maps to "", is deleted by containerd.
    """
    keys = list(fields) if fields is not None else list(labels)
    return [f"labels.{k}" for k in keys]
