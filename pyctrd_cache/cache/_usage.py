"""The arithmetic of disk usage and prune, as pure functions: who is in use through
children, which record a size-bound prune removes first, and how much a free-space policy
keeps. `Manager` gathers the inputs under its locks and applies the results."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Use:
    """A listed record's own handles, whether it is the listed half of an equal pair (its
    twin's handle on the parent counts too), and its parent."""

    refs: int
    double_ref: bool
    parent: str | None


def in_use(uses: Mapping[str, Use], leaving: Iterable[str]) -> dict[str, int]:
    """Each listed record's count of uses: its handles, less those that records being
    removed still hold on it (`leaving`, one parent id per such handle), less the handles
    of children that are themselves unused. A record is in use while its count is above 0."""
    refs = {record_id: use.refs for record_id, use in uses.items()}
    for parent in leaving:
        if parent in refs:
            refs[parent] -= 1
    # A child's handle on its parent counts as a use of the parent only while the child
    # itself is used.
    rescan = set(refs)
    while rescan:
        record_id = rescan.pop()
        use = uses[record_id]
        if refs[record_id] == 0 and use.parent is not None and use.parent in refs:
            refs[use.parent] -= 2 if use.double_ref else 1
            rescan.add(use.parent)
    return refs


def removal_order(stats: Sequence[tuple[str, int | None, int]]) -> list[str]:
    """BuildKit's order for size-bound pruning of records given as (id, last used at,
    usage count): the sum of each record's rank by last use and its rank by usage count,
    each scaled to 0..1, least first; ties keep the given order."""
    by_last_used = sorted(stats, key=lambda s: (s[1] is not None, s[1] or 0))
    last_used_rank: dict[str, int] = {}
    rank, latest = 0, -1
    for record_id, last_used_at, _ in by_last_used:
        if last_used_at is not None and last_used_at > latest:
            latest = last_used_at
            rank += 1
        last_used_rank[record_id] = rank
    max_last_used = rank or 1
    by_count = sorted(stats, key=lambda s: s[2])
    count_rank: dict[str, int] = {}
    rank, count = 0, 0
    for record_id, _, usage_count in by_count:
        if usage_count != count:
            count = usage_count
            rank += 1
        count_rank[record_id] = rank
    max_count = rank or 1
    ranked = sorted(
        stats, key=lambda s: last_used_rank[s[0]] / max_last_used + count_rank[s[0]] / max_count
    )
    return [record_id for record_id, _, _ in ranked]


def keep_bytes_for(
    total: int,
    free: int,
    *,
    reserved_space: int,
    max_used_space: int,
    min_free_space: int,
) -> int:
    """BuildKit's free-space arithmetic: how many bytes of cache a prune may keep (0: no cap).

    Keep at most `max_used_space`; less if the file system has under `min_free_space` free
    (by the shortfall); never less than `reserved_space`. With only `min_free_space` set and
    enough free space, everything is kept.
    """
    if not (max_used_space or reserved_space or min_free_space):
        return 0
    keep = max_used_space
    excess = min_free_space - free
    if excess > 0:
        keep = total - excess if keep == 0 else min(keep, total - excess)
    elif min_free_space and keep == 0:
        keep = total
    return max(keep, reserved_space)
