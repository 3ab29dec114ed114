"""The blob names the front ends and callers share with the cache core
(`pyctrd_cache.cache.blobs`, where blobs of records are handled, and
`pyctrd_cache.cache.remotes`): the label and annotation keys the core writes, and the
compression of a layer's media type."""

from __future__ import annotations

from .cache.blobs import (
    CREATED_AT_ANNOTATION,
    ESTARGZ_ANNOTATIONS,
    UNCOMPRESSED_LABEL,
    VARIANT_ANNOTATION_PREFIX,
    VARIANT_DIGEST_PREFIX,
    VARIANT_GC_REF_PREFIX,
    VARIANT_MEDIA_TYPE_LABEL,
    compression_of,
)
from .cache.remotes import DISTRIBUTION_SOURCE_PREFIX

__all__ = [
    "CREATED_AT_ANNOTATION",
    "DISTRIBUTION_SOURCE_PREFIX",
    "ESTARGZ_ANNOTATIONS",
    "UNCOMPRESSED_LABEL",
    "VARIANT_ANNOTATION_PREFIX",
    "VARIANT_DIGEST_PREFIX",
    "VARIANT_GC_REF_PREFIX",
    "VARIANT_MEDIA_TYPE_LABEL",
    "compression_of",
]
