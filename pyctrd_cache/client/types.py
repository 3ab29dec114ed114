"""Typed values the containerd client returns; free of gRPC and protobuf types."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, str] = MappingProxyType({})


def frozen_labels(labels: Mapping[str, str] | None) -> Mapping[str, str]:
    """A read-only copy of `labels`, shared when empty."""
    return MappingProxyType(dict(labels)) if labels else _EMPTY


@dataclass(frozen=True)
class Mount:
    """A mount as containerd describes it (`containerd.types.Mount`)."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotations", frozen_labels(self.annotations))

    @classmethod
    def from_oci(cls, data: Mapping[str, Any]) -> Descriptor:
        """Reads an OCI descriptor in its JSON form (`mediaType`, `digest`, `size`, ...)."""
        return cls(
            media_type=str(data["mediaType"]),
            digest=str(data["digest"]),
            size=int(data["size"]),
            annotations=dict(data.get("annotations") or {}),
        )

    def to_oci(self) -> dict[str, Any]:
        """The OCI JSON form; `annotations` only when there are some."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


class SnapshotKind(enum.Enum):
    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    parent: str
    kind: SnapshotKind
    created_at: datetime | None
    updated_at: datetime | None
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


@dataclass(frozen=True)
class ContentInfo:
    digest: str
    size: int
    created_at: datetime | None
    updated_at: datetime | None
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class IngestStatus:
    """The state of an unfinished content write (an ingest)."""

    ref: str
    offset: int
    total: int
    expected: str
    started_at: datetime | None
    updated_at: datetime | None


@dataclass(frozen=True)
class Lease:
    id: str
    created_at: datetime | None
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class LeaseResource:
    """A lease's hold on one object: `type` is `content`, `ingests` or `snapshots/<name>`."""

    id: str
    type: str

    @classmethod
    def content(cls, digest: str) -> LeaseResource:
        return cls(digest, "content")

    @classmethod
    def snapshot(cls, snapshotter: str, key: str) -> LeaseResource:
        return cls(key, f"snapshots/{snapshotter}")


@dataclass(frozen=True)
class VersionInfo:
    version: str
    revision: str


@dataclass(frozen=True)
class PluginInfo:
    type: str
    id: str
    requires: tuple[str, ...]
    exports: Mapping[str, str]
    capabilities: tuple[str, ...]
    init_error: str | None
    """containerd's message when the plugin failed to load; such a plugin is unusable."""

    @property
    def ok(self) -> bool:
        return self.init_error is None


@dataclass(frozen=True)
class ServerInfo:
    uuid: str
    pid: int
    pidns: int


@dataclass(frozen=True)
class Image:
    """A name in containerd's image store and the content it roots."""

    name: str
    target: Descriptor
    created_at: datetime | None
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
