"""The Images service: named roots of content (what a prune ref checker asks about)."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.empty_pb2 import Empty

from containerd_api.services.images.v1 import images_pb2 as pb

from ._convert import descriptor_from_pb, descriptor_to_pb
from ._transport import Transport, to_datetime
from .types import Descriptor, Image, frozen_labels

SERVICE = "containerd.services.images.v1.Images"


def _image(image: pb.Image) -> Image:
    return Image(
        name=image.name,
        target=descriptor_from_pb(image.target),
        created_at=to_datetime(image.created_at),
        labels=frozen_labels(image.labels),
    )


class ImagesService:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def list(self, *filters: str) -> list[Image]:
        req = pb.ListImagesRequest(filters=list(filters))
        res = self._t.unary(SERVICE, "List", req, pb.ListImagesResponse, idempotent=True)
        return [_image(i) for i in res.images]

    def create(
        self, name: str, target: Descriptor, *, labels: Mapping[str, str] | None = None
    ) -> Image:
        req = pb.CreateImageRequest(
            image=pb.Image(name=name, target=descriptor_to_pb(target), labels=dict(labels or {}))
        )
        res = self._t.unary(SERVICE, "Create", req, pb.CreateImageResponse, idempotent=False)
        return _image(res.image)

    def delete(self, name: str, *, sync: bool = False) -> None:
        req = pb.DeleteImageRequest(name=name, sync=sync)
        self._t.unary(
            SERVICE, "Delete", req, Empty, idempotent=True, missing_ok_on_retry=True, long=sync
        )
