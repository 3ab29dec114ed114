"""`RecordMeta` holds the enums themselves; the store converts them at the SQLite boundary
only (issue 18)."""

from __future__ import annotations

import pathlib
import sqlite3

import pytest

from pyctrd_cache import CachePolicy, LockedError, NotFoundError, RecordType, StoreDamagedError
from pyctrd_cache.metadata import DB_NAME, MetadataStore, RecordMeta


def _stored(state: pathlib.Path, record_id: str) -> tuple[object, object]:
    with sqlite3.connect(state / DB_NAME) as db:
        row = db.execute(
            "SELECT cache_policy, record_type FROM records WHERE id = ?", (record_id,)
        ).fetchone()
    db.close()
    return row[0], row[1]


def _set(state: pathlib.Path, record_id: str, column: str, value: object) -> None:
    with sqlite3.connect(state / DB_NAME) as db:
        db.execute(f"UPDATE records SET {column} = ? WHERE id = ?", (value, record_id))
    db.close()


def test_the_enums_round_trip_as_their_values(tmp_path: pathlib.Path) -> None:
    store = MetadataStore(tmp_path)
    md = RecordMeta("a", cache_policy=CachePolicy.RETAIN, record_type=RecordType.CACHE_MOUNT)
    store.insert(md)
    store.insert(RecordMeta("b"))
    got = store.get("a")
    assert got is not None
    assert got.cache_policy is CachePolicy.RETAIN
    assert got.record_type is RecordType.CACHE_MOUNT
    default = store.get("b")
    assert default is not None
    assert (default.cache_policy, default.record_type) == (
        CachePolicy.DEFAULT,
        RecordType.REGULAR,
    )
    store.close()
    assert _stored(tmp_path, "a") == (1, "exec.cachemount")
    assert _stored(tmp_path, "b") == (0, "regular")


def test_an_empty_record_type_of_an_older_store_is_regular(tmp_path: pathlib.Path) -> None:
    store = MetadataStore(tmp_path)
    store.insert(RecordMeta("old"))
    store.close()
    _set(tmp_path, "old", "record_type", "")
    store = MetadataStore(tmp_path)
    got = store.get("old")
    store.close()
    assert got is not None
    assert got.record_type is RecordType.REGULAR


@pytest.mark.parametrize(("column", "value"), [("cache_policy", 7), ("record_type", "bogus")])
def test_a_value_no_version_writes_is_a_damaged_store(
    tmp_path: pathlib.Path, column: str, value: object
) -> None:
    store = MetadataStore(tmp_path)
    store.insert(RecordMeta("x"))
    store.close()
    _set(tmp_path, "x", column, value)
    store = MetadataStore(tmp_path)
    try:
        with pytest.raises(StoreDamagedError, match=r"record x: .* is not a valid"):
            store.all()
        with pytest.raises(StoreDamagedError, match="record x"):
            store.get("x")
    finally:
        store.close()


def test_an_update_writes_only_the_columns_this_store_changed(tmp_path: pathlib.Path) -> None:
    # Two stores on one directory, as two processes have them: one's write of a column must
    # not undo the other's change of another column (a finalize there, a size here).
    mine, theirs = MetadataStore(tmp_path), MetadataStore(tmp_path)
    try:
        md = RecordMeta("r", equal_mutable="m", snapshot_id="m")
        mine.insert(md)
        finalized = theirs.get("r")
        assert finalized is not None
        theirs.track(finalized)
        finalized.equal_mutable, finalized.snapshot_id = "", "r"
        theirs.update(finalized)
        md.size = 42  # still the stale row in memory here
        mine.update(md)
        assert mine.get("r") == RecordMeta("r", snapshot_id="r", size=42)
    finally:
        mine.close()
        theirs.close()


def test_a_hold_of_another_store_blocks_removal_until_it_ends(tmp_path: pathlib.Path) -> None:
    # Two stores stand for two processes: their locks are on two open file descriptions.
    mine, theirs = MetadataStore(tmp_path), MetadataStore(tmp_path)
    try:
        mine.insert(RecordMeta("r"))
        theirs.hold("r")
        assert mine.held_elsewhere(["r", "s"]) == ["r"]
        assert theirs.held_elsewhere(["r"]) == []
        assert mine.claim_removal(["r"]) is False
        with pytest.raises(LockedError):
            mine.hold("r", exclusive=())
    finally:
        theirs.close()  # its process ends: so do its locks
    later = MetadataStore(tmp_path)
    try:
        assert mine.held_elsewhere(["r"]) == []
        assert mine.claim_removal(["r"]) is True
        stored = mine.get("r")
        assert stored is not None
        assert stored.deleted
        with pytest.raises(NotFoundError):
            later.hold("r")  # it sees the claim another store committed
        assert mine.held_elsewhere(["r"]) == []  # the refused hold was given up
    finally:
        mine.close()
        later.close()
