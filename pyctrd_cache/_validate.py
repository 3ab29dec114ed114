"""Checks of caller input, made before anything of it reaches containerd, the metadata store
or a host path. Each failure is an `InvalidError` that names the offending value.

- A digest is `sha256:` and 64 lowercase hexadecimal digits (no other algorithm).
- A record id is what this package makes: lowercase letters and digits, at most
  `MAX_RECORD_ID` characters; anything else (path separators, control characters, empty) can
  name no record.
- A description, and a key and value that become a containerd label, fit containerd's label
  limit: key and value together at most `MAX_LABEL` bytes of UTF-8 (containerd's
  `labels.Validate`).
- A descriptor has a well-formed digest, a size from 0 to `MAX_SIZE` (what containerd's
  int64 and SQLite's integers hold), and annotations that fit as labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from .client.types import Descriptor
from .errors import InvalidError

__all__ = [
    "ANNOTATION_LABEL_PREFIX",
    "MAX_LABEL",
    "MAX_RECORD_ID",
    "MAX_SIZE",
    "annotation_labels",
    "description",
    "descriptor",
    "digest",
    "label",
    "record_id",
    "size",
]

MAX_LABEL: Final = 4096
ANNOTATION_LABEL_PREFIX: Final = "buildkit.io/compression/annotation."
"""Annotations kept with a blob become content labels named with this prefix."""
MAX_RECORD_ID: Final = 64
MAX_SIZE: Final = (1 << 63) - 1
"""The largest blob size: containerd's sizes are int64, as are SQLite's integers."""
_DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}")
_RECORD_ID: Final = re.compile(rf"[0-9a-z]{{1,{MAX_RECORD_ID}}}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:150]}... ({len(text)} characters)"


def digest(value: object, *, what: str = "digest") -> str:
    """`value` if it is a sha256 digest in canonical form."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise InvalidError(f"malformed {what} {_shown(value)}: expected sha256: and 64 hex digits")
    return value


def record_id(value: object) -> str:
    """`value` if it could name a record of this package."""
    if not isinstance(value, str) or not _RECORD_ID.fullmatch(value):
        raise InvalidError(
            f"invalid record id {_shown(value)}: record ids are 1 to {MAX_RECORD_ID} "
            "lowercase letters and digits"
        )
    return value


def label(key: str, value: str) -> None:
    """Refuses a key and value that containerd would refuse as a label."""
    size = len(key.encode()) + len(value.encode())
    if size > MAX_LABEL:
        raise InvalidError(
            f"label {_shown(key)} is too long: key and value take {size} bytes, "
            f"containerd allows {MAX_LABEL}"
        )


def description(value: object) -> str:
    """`value` if it is a string of at most `MAX_LABEL` bytes."""
    if not isinstance(value, str):
        raise InvalidError(f"a description must be a string, not {_shown(value)}")
    size = len(value.encode())
    if size > MAX_LABEL:
        raise InvalidError(
            f"description {_shown(value)} is too long: {size} bytes, at most {MAX_LABEL}"
        )
    return value


def annotation_labels(values: Mapping[str, str], *, prefix: str = "") -> None:
    """Refuses annotations that cannot all become labels named `prefix` + key."""
    for key, value in values.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidError(f"annotation {_shown(key)}: keys and values must be strings")
        label(prefix + key, value)


def size(value: object, *, what: str = "size") -> int:
    """`value` if it is an int from 0 to `MAX_SIZE`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SIZE:
        raise InvalidError(f"invalid {what} {_shown(value)}: expected 0 to 2^63-1 bytes")
    return value


def descriptor(desc: Descriptor) -> Descriptor:
    """`desc` if its digest, size and annotations are acceptable."""
    if not isinstance(desc, Descriptor):
        raise InvalidError(f"expected a Descriptor, not {_shown(desc)}")
    digest(desc.digest)
    size(desc.size, what=f"size of {desc.digest}")
    if not isinstance(desc.media_type, str) or not desc.media_type:
        raise InvalidError(f"invalid media type {_shown(desc.media_type)} of {desc.digest}")
    annotation_labels(desc.annotations, prefix=ANNOTATION_LABEL_PREFIX)
    return desc
