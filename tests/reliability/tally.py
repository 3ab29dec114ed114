"""Figures of the reliability suite: each category adds its counts as tests run, and the
suite ends with one summary line per category (printed by tests/reliability/conftest.py).

The size of the run comes from PYCTRD_RELIABILITY: `ci` (the default, bounded for .ci/run)
or `long` (the long run whose figures the README quotes).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Final

LONG: Final = os.environ.get("PYCTRD_RELIABILITY", "ci") == "long"


def scaled(ci: int, long: int) -> int:
    """`ci` in the bounded run, `long` in the long one."""
    return long if LONG else ci


# category -> counter -> value, in the order first added.
FIGURES: dict[str, dict[str, int]] = defaultdict(dict)


def add(category: str, **counts: int) -> None:
    """Adds `counts` to the category's counters (a counter first added is listed first)."""
    figures = FIGURES[category]
    for name, value in counts.items():
        figures[name] = figures.get(name, 0) + value


def lines() -> list[str]:
    return [
        f"{category}: "
        + ", ".join(f"{name.replace('_', ' ')}: {value}" for name, value in c.items())
        for category, c in FIGURES.items()
    ]
