"""The blob names the front ends share with the cache core (`pyctrd_cache.cache.blobs`,
where blobs of records are handled): annotation keys, and the compression of a layer's
media type."""

from __future__ import annotations

from .cache.blobs import CREATED_AT_ANNOTATION, UNCOMPRESSED_LABEL, compression_of
from .cache.remotes import DISTRIBUTION_SOURCE_PREFIX

__all__ = [
    "CREATED_AT_ANNOTATION",
    "DISTRIBUTION_SOURCE_PREFIX",
    "UNCOMPRESSED_LABEL",
    "compression_of",
]
