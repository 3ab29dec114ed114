"""The Diff service: applying layer blobs to snapshots and computing layers from mounts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from containerd_api.services.diff.v1 import diff_pb2 as pb

from ._convert import descriptor_from_pb, descriptor_to_pb, mounts_to_pb
from ._transport import Transport
from .types import Descriptor, Mount

SERVICE = "containerd.services.diff.v1.Diff"


class DiffService:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def apply(
        self, desc: Descriptor, mounts: Sequence[Mount], *, sync_fs: bool = False
    ) -> Descriptor:
        """Unpacks the blob `desc` from the content store onto `mounts`.

        Returns the uncompressed stream's descriptor (its digest is the layer's diff id).
        """
        req = pb.ApplyRequest(
            diff=descriptor_to_pb(desc), mounts=mounts_to_pb(mounts), sync_fs=sync_fs
        )
        return descriptor_from_pb(
            self._t.unary(
                SERVICE, "Apply", req, pb.ApplyResponse, idempotent=False, long=True
            ).applied
        )

    def diff(
        self,
        left: Sequence[Mount],
        right: Sequence[Mount],
        *,
        media_type: str = "",
        ref: str = "",
        labels: Mapping[str, str] | None = None,
        source_date_epoch: datetime | None = None,
    ) -> Descriptor:
        """Writes the layer that turns `left` into `right` to the content store.

        `media_type` "" means gzip. A daemon that cannot write the media type raises
        `UnimplementedError` (zstd before containerd 1.7.29 and 2.0.1). For compressed
        output containerd sets the `containerd.io/uncompressed` content label.
        """
        req = pb.DiffRequest(
            left=mounts_to_pb(left),
            right=mounts_to_pb(right),
            media_type=media_type,
            ref=ref,
            labels=dict(labels or {}),
        )
        if source_date_epoch is not None:
            ts = Timestamp()
            ts.FromDatetime(source_date_epoch)
            req.source_date_epoch.CopyFrom(ts)
        return descriptor_from_pb(
            self._t.unary(SERVICE, "Diff", req, pb.DiffResponse, idempotent=False, long=True).diff
        )
