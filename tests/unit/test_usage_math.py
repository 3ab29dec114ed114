"""The usage arithmetic of `disk_usage` and prune, as pure functions
(`pyctrd_cache.cache._usage`): in use through children, and the removal order of a
size-bound prune."""

from __future__ import annotations

import pytest

from pyctrd_cache.cache._usage import Use, in_use, removal_order


@pytest.mark.parametrize(
    ("uses", "leaving", "expected"),
    [
        pytest.param({"a": Use(0, False, None)}, [], {"a": 0}, id="an unused record"),
        pytest.param({"a": Use(2, False, None)}, [], {"a": 2}, id="its own handles"),
        pytest.param(
            {"p": Use(1, False, None), "c": Use(0, False, "p")},
            [],
            {"p": 0, "c": 0},
            id="an unused child's handle is no use of the parent",
        ),
        pytest.param(
            {"p": Use(1, False, None), "c": Use(1, False, "p")},
            [],
            {"p": 1, "c": 1},
            id="a used child's handle is a use of the parent",
        ),
        pytest.param(
            {"g": Use(1, False, None), "p": Use(1, False, "g"), "c": Use(0, False, "p")},
            [],
            {"g": 0, "p": 0, "c": 0},
            id="unused through a chain",
        ),
        pytest.param(
            {"p": Use(2, False, None), "i": Use(0, True, "p")},
            [],
            {"p": 0, "i": 0},
            id="an unused equal pair held the parent twice",
        ),
        pytest.param(
            {"p": Use(1, False, None)},
            ["p", "gone"],
            {"p": 0},
            id="a handle of a record being removed is no use",
        ),
    ],
)
def test_in_use_counts_through_children(
    uses: dict[str, Use], leaving: list[str], expected: dict[str, int]
) -> None:
    assert in_use(uses, leaving) == expected


def test_removal_order_least_recently_and_least_often_used_first() -> None:
    stats = [
        ("recent-often", 300, 5),
        ("old-rare", 100, 1),
        ("never-used", None, 0),
        ("middle", 200, 2),
    ]
    assert removal_order(stats) == ["never-used", "old-rare", "middle", "recent-often"]


def test_removal_order_keeps_the_given_order_on_ties() -> None:
    stats = [("b", 100, 1), ("a", 100, 1), ("c", 100, 1)]
    assert removal_order(stats) == ["b", "a", "c"]
    assert removal_order([]) == []


def test_a_frequent_use_can_outweigh_an_older_last_use() -> None:
    # ranks: last use old=1, new=2 of 2; count rare=1, often=2 of 2
    stats = [("new-rare", 200, 1), ("old-often", 100, 9), ("new-often", 200, 9)]
    assert removal_order(stats)[-1] == "new-often"
    assert set(removal_order(stats)[:2]) == {"new-rare", "old-often"}
