"""A record's life is one `RecordState`, changed only by `_Record._transition` against one
table (issue 18), and every method of `_Record` says which locks its caller holds."""

from __future__ import annotations

import ast
import inspect
import itertools
import pathlib
from typing import cast

import pytest

from pyctrd_cache.cache import refs
from pyctrd_cache.cache._core import Core
from pyctrd_cache.cache.refs import RecordState, _Record
from pyctrd_cache.errors import CacheError
from pyctrd_cache.metadata import RecordMeta

LIVE, REMOVING, GONE = RecordState.LIVE, RecordState.REMOVING, RecordState.GONE
LEGAL = {(LIVE, REMOVING), (LIVE, GONE), (REMOVING, GONE)}
LOCK_RULES = (
    "Caller holds `self.mu`",
    "Caller holds the manager lock and `self.mu`",
    "Takes `self.mu` itself",
    "Needs no lock",
)


class _Store:
    """The metadata store's writes, counted."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, bool]] = []

    def update(self, *metas: RecordMeta, unhold: tuple[str, str] | None = None) -> None:
        self.updates += [(md.id, md.deleted) for md in metas]


class _Core:
    """What `_Record` reads of the core in these tests: the records and the store."""

    def __init__(self) -> None:
        self.records: dict[str, _Record] = {}
        self.store = _Store()


def _record(core: _Core, record_id: str = "r", state: RecordState = LIVE) -> _Record:
    rec = _Record(cast(Core, core), RecordMeta(record_id), mutable=True, parent=None)
    core.records[record_id] = rec
    if state is not LIVE:
        rec._transition(state)
    return rec


@pytest.mark.parametrize(("start", "to"), list(itertools.product(RecordState, repeat=2)))
def test_only_the_tables_transitions_are_allowed(start: RecordState, to: RecordState) -> None:
    rec = _record(_Core(), state=start)
    deleted = rec.md.deleted
    if (start, to) in LEGAL:
        rec._transition(to)
        assert (rec.state, rec.md.deleted) == (to, True)
    else:
        with pytest.raises(CacheError, match=f"cannot go from {start.value} to {to.value}"):
            rec._transition(to)
        assert (rec.state, rec.md.deleted) == (start, deleted)


def test_a_new_record_is_live_and_its_row_not_deleted() -> None:
    rec = _record(_Core())
    assert (rec.state, rec.md.deleted, rec.is_dead()) == (LIVE, False, False)


@pytest.mark.parametrize(("leaving", "state"), list(itertools.product("mi", [REMOVING, GONE])))
def test_a_record_is_dead_when_it_or_its_equal_twin_left_live(
    leaving: str, state: RecordState
) -> None:
    core = _Core()
    mutable, immutable = _record(core, "m"), _record(core, "i")
    mutable.equal_immutable = cast(refs.ImmutableRef, _Handle(immutable))
    immutable.equal_mutable = cast(refs.MutableRef, _Handle(mutable))
    assert (mutable.is_dead(), immutable.is_dead()) == (False, False)
    core.records[leaving]._transition(state)
    assert (mutable.is_dead(), immutable.is_dead()) == (True, True)


class _Handle:
    def __init__(self, rec: _Record) -> None:
        self._rec = rec


def test_detaching_a_live_record_writes_its_row_marked_deleted_once() -> None:
    core = _Core()
    rec = _record(core)
    rec.detach()
    assert rec.state is GONE
    assert core.records == {}
    assert core.store.updates == [("r", True)]


def test_detaching_a_removing_record_leaves_its_row_as_the_finalize_wrote_it() -> None:
    core = _Core()
    rec = _record(core, state=REMOVING)
    rec.detach()
    assert (rec.state, core.records, core.store.updates) == (GONE, {}, [])


def test_a_gone_record_is_never_detached_again_nor_its_row_written() -> None:
    core = _Core()
    rec = _record(core)
    rec.detach()
    rec.save()
    with pytest.raises(CacheError, match="cannot go from gone to gone"):
        rec.detach()
    assert core.store.updates == [("r", True)]


def test_a_live_or_removing_records_row_is_saved() -> None:
    core = _Core()
    live, removing = _record(core, "l"), _record(core, "d", state=REMOVING)
    live.save()
    removing.save()
    assert core.store.updates == [("l", False), ("d", True)]


def test_the_state_changes_only_in_transition() -> None:
    """No code of the core assigns `_state` but `_Record.__init__` and `_transition`."""
    core = pathlib.Path(refs.__file__).parent
    writers = []
    for path in sorted(core.glob("*.py")):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef):
                continue
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == "_state"
                    and isinstance(node.ctx, ast.Store)
                ):
                    writers.append(f"{path.name}:{func.name}")
    assert sorted(writers) == ["refs.py:__init__", "refs.py:_transition"]


def _methods() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for name, member in vars(_Record).items():
        if name.startswith("__"):
            continue
        func = member.fget if isinstance(member, property) else member
        if inspect.isfunction(func):
            found.append((name, func))
    return found


def test_every_record_method_says_which_locks_its_caller_holds() -> None:
    assert {"state", "finalize", "_size_state"} <= {name for name, _ in _methods()}
    silent = [
        name
        for name, func in _methods()
        if not any(rule in " ".join((inspect.getdoc(func) or "").split()) for rule in LOCK_RULES)
    ]
    assert silent == []
