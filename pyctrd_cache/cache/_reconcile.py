"""Reconciliation as data: what `Manager.open` must do to bring the metadata store in line
with containerd after a restart or a crash, computed without touching either
(docs/design.md, "Where state lives, and why a crash loses nothing").

`plan` reads the rows, the leases this manager owns and the snapshots, and says what to
change; `Manager` applies the plan in its field order, which keeps the crash rules: a row
is dropped only after its lease, and a finalize is completed (one transaction) before the
removals it implies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..client import SnapshotKind
from ..metadata import RecordMeta


@dataclass(frozen=True)
class Drop:
    """A row to drop, after its lease when `lease` is set."""

    record_id: str
    lease: bool
    interrupted: bool
    """The store had marked the row deleted (a removal stopped half way); otherwise the
    record's containerd objects are gone."""


@dataclass(frozen=True)
class ReconcilePlan:
    """What to change, in the order to apply it."""

    lost: tuple[str, ...]
    """Record leases with no row: the store lost records (`StoreDamagedError` unless
    repairing; repairing deletes them with `stray_leases`)."""
    finish_finalizes: tuple[tuple[RecordMeta, ...], ...]
    """Finalizes that committed the snapshot but not the row: each the rows to write in one
    transaction (the immutable linked to its snapshot, and its mutable marked deleted)."""
    unfinalized_leases: tuple[str, ...]
    """Leases of finalizes that stopped before committing the snapshot."""
    drops: tuple[Drop, ...]
    """Rows to drop: interrupted removals first, then records whose objects are gone."""
    keep: tuple[str, ...]
    """The records to load."""
    stray_leases: tuple[str, ...]
    """Leases of this manager that no kept row accounts for."""
    collect: bool
    """Whether a lease of this manager went, so that containerd collects before `open`
    returns."""


def plan(
    rows: Iterable[RecordMeta],
    leases: Mapping[str, bool],
    snapshots: Mapping[str, SnapshotKind],
) -> ReconcilePlan:
    """The plan for the store's `rows`, the leases this manager owns (id: whether it is a
    record's lease) and the snapshots of the snapshotter (name: kind). Reads its inputs
    only."""
    by_id = {md.id: md.copy() for md in rows}
    held = set(leases)
    lost = tuple(sorted(i for i, record in leases.items() if record and i not in by_id))

    finishes: list[tuple[RecordMeta, ...]] = []
    for md in by_id.values():
        if (
            md.equal_mutable
            and not md.deleted
            and md.id in held
            and snapshots.get(md.id) is SnapshotKind.COMMITTED
        ):
            twin = by_id.get(md.equal_mutable)
            md.equal_mutable = ""
            md.snapshot_id = md.id
            if twin is not None:
                twin.deleted = True
            finishes.append((md,) if twin is None else (md, twin))

    unfinalized = tuple(md.id for md in by_id.values() if md.equal_mutable and md.id in held)
    held -= set(unfinalized)

    drops = [Drop(md.id, lease=True, interrupted=True) for md in by_id.values() if md.deleted]
    for drop in drops:
        held.discard(drop.record_id)
        del by_id[drop.record_id]

    valid: dict[str, bool] = {}

    def is_valid(record_id: str, seen: frozenset[str] = frozenset()) -> bool:
        if record_id in valid:
            return valid[record_id]
        md = by_id.get(record_id)
        ok = md is not None and record_id not in seen
        if md is not None and ok:
            seen = seen | {record_id}
            if md.parent and not is_valid(md.parent, seen):
                ok = False
            elif md.equal_mutable:
                twin = by_id.get(md.equal_mutable)
                ok = twin is not None and not twin.committed and is_valid(twin.id, seen)
            elif not md.committed:
                ok = md.id in held and snapshots.get(md.snapshot_id) is SnapshotKind.ACTIVE
            else:
                ok = md.id in held and (
                    md.blob_only or snapshots.get(md.snapshot_id) is SnapshotKind.COMMITTED
                )
        valid[record_id] = ok
        return ok

    gone = [record_id for record_id in by_id if not is_valid(record_id)]
    for record_id in gone:
        drops.append(Drop(record_id, lease=record_id in held, interrupted=False))
        held.discard(record_id)
        del by_id[record_id]

    return ReconcilePlan(
        lost=lost,
        finish_finalizes=tuple(finishes),
        unfinalized_leases=unfinalized,
        drops=tuple(drops),
        keep=tuple(by_id),
        stray_leases=tuple(sorted(held - by_id.keys())),
        collect=bool(leases.keys() - by_id.keys()),
    )
