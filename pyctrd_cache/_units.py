"""Durations as people write them on command lines and in filters."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from typing import Final

__all__ = ["parse_duration"]

_DURATION_UNITS: Final = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
    "w": Decimal(7 * 86400),
}
_DURATION_PART_RE: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d|w)")
_DURATION_RE: Final = re.compile(f"(?:{_DURATION_PART_RE.pattern})+")


def parse_duration(text: str) -> timedelta:
    """A duration in Go's notation plus days and weeks: `48h`, `30m`, `90s`, `1h30m`, `2d`,
    `1.5h`, `1w`; units are lowercase; a bare `0` is zero.

    `ValueError` on anything else.
    """
    if text == "0":
        return timedelta(0)
    if _DURATION_RE.fullmatch(text) is None:
        raise ValueError(
            f"invalid duration {text!r} (expected e.g. 48h, 30m, 90s, 1h30m, 2d; "
            "units ns, us, ms, s, m, h, d, w)"
        )
    seconds = sum(
        (Decimal(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART_RE.findall(text)),
        Decimal(0),
    )
    try:
        return timedelta(seconds=float(seconds))
    except OverflowError:
        raise ValueError(f"invalid duration {text!r} (too long)") from None
