"""The filters of disk usage and prune: containerd's syntax over the fields of `UsageInfo`.

Field names are checked: containerd's matcher answers an unknown field as absent, so a
misspelt `descripton!=x` would match every record, and a prune with it would remove them
all. BuildKit's and buildx's spellings are accepted too: `parent` for `parents`, and, in a
prune, a filter `until=DURATION` (or `until==DURATION`) of its own, which is buildx's way of
giving a keep duration.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from . import filters
from ._units import parse_duration
from .errors import InvalidError
from .types import UsageInfo

__all__ = ["FIELDS", "UsageFilter", "adaptor", "compile_filters"]

FIELDS: Final = (
    "id",
    "parents",
    "parent",
    "description",
    "inuse",
    "mutable",
    "immutable",
    "type",
    "shared",
    "private",
)
_UNTIL: Final = re.compile(r"\s*until\s*==?\s*(?P<duration>[^\s,]*)\s*")


@dataclass(frozen=True)
class UsageFilter:
    """Parsed usage filters: what records must match, and the keep duration an `until`
    filter gave (the longest, when several did)."""

    filter: filters.Filter
    until: timedelta | None = None

    def match(self, info: UsageInfo) -> bool:
        return self.filter.match(adaptor(info))


def compile_filters(filter_strings: Sequence[str], *, prune: bool = False) -> UsageFilter:
    """The filter of a usage report (`prune=False`) or of a prune policy.

    `InvalidError` for a malformed filter, a field outside `FIELDS` (naming it and the valid
    ones), or an `until` filter outside a prune or with a malformed duration.
    """
    rest: list[str] = []
    until: timedelta | None = None
    for one in filter_strings:
        m = _UNTIL.fullmatch(one)
        if m is None:
            rest.append(one)
            continue
        if not prune:
            raise InvalidError(f"invalid filter {one!r}: 'until' applies only to a prune")
        try:
            duration = parse_duration(m["duration"])
        except ValueError as err:
            raise InvalidError(f"invalid filter {one!r}: {err}") from None
        until = duration if until is None else max(until, duration)
    if until is not None and not rest:
        # The `until` filters only bound the age: every record matches the rest.
        return UsageFilter(filters.parse_all(), until)
    return UsageFilter(filters.parse_all(*rest, fields=FIELDS), until)


def adaptor(info: UsageInfo) -> filters.Adaptor:
    """The fields of one record, as the filters see them."""
    parent = (info.parents[0] if info.parents else "", bool(info.parents))
    return filters.adapt(
        {
            "id": (info.id, bool(info.id)),
            "parents": parent,
            "parent": parent,
            "description": (info.description, bool(info.description)),
            "inuse": ("", info.in_use),
            "mutable": ("", info.mutable),
            "immutable": ("", not info.mutable),
            "type": (info.record_type.value, True),
            "shared": ("", info.shared),
            "private": ("", not info.shared),
        }
    )
