"""The Snapshots service of one snapshotter."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from google.protobuf.empty_pb2 import Empty
from google.protobuf.field_mask_pb2 import FieldMask

from containerd_api.services.snapshots.v1 import snapshots_pb2 as pb

from ..errors import ContainerdError
from ._convert import label_paths, mounts_from_pb
from ._transport import Transport, to_datetime
from .types import Mount, SnapshotInfo, SnapshotKind, Usage, frozen_labels

SERVICE = "containerd.services.snapshots.v1.Snapshots"

log = logging.getLogger(__name__)

# containerd's overlayfs and native snapshotters name a new snapshot's directory by an id
# from a sequence in their own bolt store, renaming the directory into place before that
# store commits. A daemon killed between the two leaves the directory behind with the
# sequence rolled back, so the next create meets it: that create fails with "failed to
# rename ...: file exists" and, while failing, removes the stray directory (containerd
# 1.6-2.1). Nothing of the failed create remains, so it is repeated, a bounded number of
# times since each repetition can only meet a directory left by a later kill.
_STRAY_DIRECTORY_RETRIES = 3


def _stray_directory(err: ContainerdError) -> bool:
    return "failed to rename" in err.message and "file exists" in err.message


def _info(info: pb.Info) -> SnapshotInfo:
    return SnapshotInfo(
        name=info.name,
        parent=info.parent,
        kind=SnapshotKind(info.kind),
        created_at=to_datetime(info.created_at),
        updated_at=to_datetime(info.updated_at),
        labels=frozen_labels(info.labels),
    )


class SnapshotsService:
    """Snapshots of the snapshotter `name` in the client's namespace."""

    def __init__(self, transport: Transport, name: str) -> None:
        self._t = transport
        self.name = name

    def prepare(
        self, key: str, parent: str = "", *, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Creates the active (writable) snapshot `key` on the committed `parent`."""
        req = pb.PrepareSnapshotRequest(
            snapshotter=self.name, key=key, parent=parent, labels=dict(labels or {})
        )
        return self._create("Prepare", req, pb.PrepareSnapshotResponse, key)

    def view(
        self, key: str, parent: str = "", *, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Creates the read-only view `key` of the committed `parent`."""
        req = pb.ViewSnapshotRequest(
            snapshotter=self.name, key=key, parent=parent, labels=dict(labels or {})
        )
        return self._create("View", req, pb.ViewSnapshotResponse, key)

    def _create(
        self,
        method: str,
        req: pb.PrepareSnapshotRequest | pb.ViewSnapshotRequest,
        response_type: type[pb.PrepareSnapshotResponse] | type[pb.ViewSnapshotResponse],
        key: str,
    ) -> list[Mount]:
        """Prepare or View, repeated while it meets a directory a killed daemon left."""
        for attempt in range(_STRAY_DIRECTORY_RETRIES):
            try:
                reply = self._t.unary(SERVICE, method, req, response_type, idempotent=False)
                return mounts_from_pb(reply.mounts)
            except ContainerdError as err:
                if attempt + 1 == _STRAY_DIRECTORY_RETRIES or not _stray_directory(err):
                    raise
                log.warning(
                    "snapshot %s met a directory left by a killed containerd, which removed "
                    "it; creating it again: %s",
                    key,
                    err.message,
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active snapshot or view."""
        req = pb.MountsRequest(snapshotter=self.name, key=key)
        return mounts_from_pb(
            self._t.unary(SERVICE, "Mounts", req, pb.MountsResponse, idempotent=True).mounts
        )

    def commit(self, name: str, key: str, *, labels: Mapping[str, str] | None = None) -> None:
        """Turns the active snapshot `key` into the committed snapshot `name`."""
        req = pb.CommitSnapshotRequest(
            snapshotter=self.name, name=name, key=key, labels=dict(labels or {})
        )
        self._t.unary(SERVICE, "Commit", req, Empty, idempotent=False)

    def remove(self, key: str) -> None:
        req = pb.RemoveSnapshotRequest(snapshotter=self.name, key=key)
        self._t.unary(SERVICE, "Remove", req, Empty, idempotent=True, missing_ok_on_retry=True)

    def stat(self, key: str) -> SnapshotInfo:
        req = pb.StatSnapshotRequest(snapshotter=self.name, key=key)
        return _info(
            self._t.unary(SERVICE, "Stat", req, pb.StatSnapshotResponse, idempotent=True).info
        )

    def update_labels(
        self, key: str, labels: Mapping[str, str], *, fields: Iterable[str] | None = None
    ) -> SnapshotInfo:
        """Sets the labels named in `fields` (default: every key of `labels`) on `key`.

        A named label that is missing from `labels` or empty is removed.
        """
        req = pb.UpdateSnapshotRequest(
            snapshotter=self.name,
            info=pb.Info(name=key, labels=dict(labels)),
            update_mask=FieldMask(paths=label_paths(labels, fields)),
        )
        return _info(
            self._t.unary(SERVICE, "Update", req, pb.UpdateSnapshotResponse, idempotent=True).info
        )

    def list(self, *filters: str) -> list[SnapshotInfo]:
        """Snapshots matching any of `filters` (containerd filter syntax), or all."""
        req = pb.ListSnapshotsRequest(snapshotter=self.name, filters=list(filters))
        return [
            _info(i)
            for batch in self._t.collect(SERVICE, "List", req, pb.ListSnapshotsResponse)
            for i in batch.info
        ]

    def usage(self, key: str) -> Usage:
        req = pb.UsageRequest(snapshotter=self.name, key=key)
        res = self._t.unary(SERVICE, "Usage", req, pb.UsageResponse, idempotent=True)
        return Usage(size=res.size, inodes=res.inodes)
