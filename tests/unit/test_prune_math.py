"""BuildKit's free-space arithmetic and its removal order, as pure functions."""

from __future__ import annotations

from pyctrd_cache.manager import keep_bytes_for

GB = 10**9


def keep(total: int, free: int, reserved: int = 0, max_used: int = 0, min_free: int = 0) -> int:
    return keep_bytes_for(
        total, free, reserved_space=reserved, max_used_space=max_used, min_free_space=min_free
    )


def test_no_policy_means_no_cap() -> None:
    assert keep(10 * GB, 1 * GB) == 0


def test_reserved_space_alone_keeps_that_much() -> None:
    assert keep(10 * GB, 1 * GB, reserved=4 * GB) == 4 * GB


def test_max_used_space_caps_the_cache() -> None:
    assert keep(10 * GB, 100 * GB, max_used=6 * GB) == 6 * GB


def test_min_free_space_frees_the_shortfall() -> None:
    # 3 GB free, 5 GB wanted: 2 GB must go from a 10 GB cache.
    assert keep(10 * GB, 3 * GB, min_free=5 * GB) == 8 * GB


def test_min_free_space_already_met_keeps_everything() -> None:
    assert keep(10 * GB, 50 * GB, min_free=5 * GB) == 10 * GB


def test_the_stricter_of_max_used_and_min_free_wins() -> None:
    assert keep(10 * GB, 3 * GB, max_used=9 * GB, min_free=5 * GB) == 8 * GB
    assert keep(10 * GB, 3 * GB, max_used=7 * GB, min_free=5 * GB) == 7 * GB


def test_never_below_reserved_space() -> None:
    assert keep(10 * GB, 0, reserved=9 * GB, min_free=5 * GB) == 9 * GB
    assert keep(10 * GB, 100 * GB, reserved=2 * GB, max_used=1 * GB) == 2 * GB
