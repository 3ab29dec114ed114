"""`Manager.open`'s reconciliation as data: one case per crash state of the table in
docs/design.md ("Where state lives, and why a crash loses nothing"), plus lost and broken
records. Each case is the state a crash at one point leaves (rows, this manager's leases,
snapshots) and the plan that repairs it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pyctrd_cache.cache._reconcile import Drop, ReconcilePlan, plan
from pyctrd_cache.client import SnapshotKind
from pyctrd_cache.metadata import RecordMeta

ACTIVE, COMMITTED = SnapshotKind.ACTIVE, SnapshotKind.COMMITTED


def mutable(record_id: str = "m", **kw: object) -> RecordMeta:
    return RecordMeta(record_id, snapshot_id=record_id, **kw)  # type: ignore[arg-type]


def committed(record_id: str = "i", **kw: object) -> RecordMeta:
    return RecordMeta(record_id, committed=True, snapshot_id=record_id, **kw)  # type: ignore[arg-type]


def pair_row(record_id: str = "i", twin: str = "m") -> RecordMeta:
    """The immutable row `commit` writes: equal to the mutable, on its snapshot."""
    return RecordMeta(record_id, committed=True, equal_mutable=twin, snapshot_id=twin)


@dataclass
class Case:
    rows: list[RecordMeta]
    leases: dict[str, bool]
    snapshots: dict[str, SnapshotKind]
    keep: tuple[str, ...] = ()
    drops: tuple[Drop, ...] = ()
    finishes: tuple[tuple[str, ...], ...] = ()
    unfinalized: tuple[str, ...] = ()
    stray: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()
    collect: bool = False
    finished_rows: list[RecordMeta] = field(default_factory=list)


CASES = {
    # new: row, lease, snapshot under it.
    "new: crash after the row": Case(
        rows=[mutable()],
        leases={},
        snapshots={},
        drops=(Drop("m", lease=False, interrupted=False),),
    ),
    "new: crash after the lease": Case(
        rows=[mutable()],
        leases={"m": True},
        snapshots={},
        drops=(Drop("m", lease=True, interrupted=False),),
        collect=True,
    ),
    "new: done": Case(
        rows=[mutable()],
        leases={"m": True},
        snapshots={"m": ACTIVE},
        keep=("m",),
    ),
    # commit: one row, equal to the mutable.
    "commit: crash after the row": Case(
        rows=[mutable(), pair_row()],
        leases={"m": True},
        snapshots={"m": ACTIVE},
        keep=("m", "i"),
    ),
    # finalize: lease of the immutable, commit of the snapshot under it, one transaction,
    # removal of the mutable.
    "finalize: crash after the lease": Case(
        rows=[mutable(), pair_row()],
        leases={"m": True, "i": True},
        snapshots={"m": ACTIVE},
        unfinalized=("i",),
        keep=("m", "i"),
    ),
    "finalize: crash after the snapshot commit": Case(
        rows=[mutable(), pair_row()],
        leases={"m": True, "i": True},
        snapshots={"m": ACTIVE, "i": COMMITTED},
        finishes=(("i", "m"),),
        finished_rows=[committed("i"), mutable(deleted=True)],
        drops=(Drop("m", lease=True, interrupted=True),),
        keep=("i",),
        collect=True,
    ),
    "finalize: crash after the transaction": Case(
        rows=[mutable(deleted=True), committed()],
        leases={"m": True, "i": True},
        snapshots={"m": ACTIVE, "i": COMMITTED},
        drops=(Drop("m", lease=True, interrupted=True),),
        keep=("i",),
        collect=True,
    ),
    # remove: row marked deleted, lease deleted, row dropped.
    "remove: crash after marking the row": Case(
        rows=[committed(deleted=True)],
        leases={"i": True},
        snapshots={"i": COMMITTED},
        drops=(Drop("i", lease=True, interrupted=True),),
        collect=True,
    ),
    "remove: crash after deleting the lease": Case(
        rows=[committed(deleted=True)],
        leases={},
        snapshots={"i": COMMITTED},
        drops=(Drop("i", lease=True, interrupted=True),),
    ),
    # A record by blob is written marked deleted until its lease holds its data.
    "blob record: crash before its lease holds the data": Case(
        rows=[committed("b", blob="sha256:b", blob_only=True, deleted=True)],
        leases={"b": True},
        snapshots={},
        drops=(Drop("b", lease=True, interrupted=True),),
        collect=True,
    ),
    "blob record: lazy, no snapshot yet": Case(
        rows=[committed("b", blob="sha256:b", blob_only=True)],
        leases={"b": True},
        snapshots={},
        keep=("b",),
    ),
    # Records whose data went, and what is built on them.
    "a child of a dropped record goes too": Case(
        rows=[committed("p"), committed("c", parent="p")],
        leases={"p": True, "c": True},
        snapshots={"c": COMMITTED},
        drops=(
            Drop("p", lease=True, interrupted=False),
            Drop("c", lease=True, interrupted=False),
        ),
        collect=True,
    ),
    "a committed record whose snapshot is active is broken": Case(
        rows=[committed()],
        leases={"i": True},
        snapshots={"i": ACTIVE},
        drops=(Drop("i", lease=True, interrupted=False),),
        collect=True,
    ),
    # Leases no row accounts for.
    "a lease of another kind is stray": Case(
        rows=[],
        leases={"caller-x": False, "temp-y": False},
        snapshots={},
        stray=("caller-x", "temp-y"),
        collect=True,
    ),
    "a record lease without its row means lost records": Case(
        rows=[committed()],
        leases={"i": True, "gone2": True, "gone1": True},
        snapshots={"i": COMMITTED},
        keep=("i",),
        lost=("gone1", "gone2"),
        stray=("gone1", "gone2"),
        collect=True,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_the_plan_for_each_crash_state(name: str) -> None:
    case = CASES[name]
    rows_before = [md.copy() for md in case.rows]
    result = plan(case.rows, case.leases, case.snapshots)
    assert isinstance(result, ReconcilePlan)
    assert result.keep == case.keep
    assert result.drops == case.drops
    assert tuple(tuple(md.id for md in f) for f in result.finish_finalizes) == case.finishes
    if case.finished_rows:
        assert [md for f in result.finish_finalizes for md in f] == case.finished_rows
    assert result.unfinalized_leases == case.unfinalized
    assert result.stray_leases == case.stray
    assert result.lost == case.lost
    assert result.collect is case.collect
    assert case.rows == rows_before, "plan changed its input"


def test_every_row_is_kept_or_dropped_and_every_lease_is_accounted_for() -> None:
    for name, case in CASES.items():
        result = plan(case.rows, case.leases, case.snapshots)
        dropped = [d.record_id for d in result.drops]
        assert sorted([*result.keep, *dropped]) == sorted(md.id for md in case.rows), name
        kept_leases = set(case.leases) - set(result.stray_leases) - set(result.unfinalized_leases)
        kept_leases -= {d.record_id for d in result.drops if d.lease}
        assert kept_leases <= set(result.keep), name
