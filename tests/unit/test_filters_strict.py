"""Filter fields are checked, so that a misspelt field cannot match every record (issue 15)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pyctrd_cache import InvalidError, RecordType, UsageInfo
from pyctrd_cache.filters import parse_all
from pyctrd_cache.usage_filters import FIELDS, compile_filters


def usage(**fields: object) -> UsageInfo:
    values: dict[str, object] = {
        "id": "abc",
        "mutable": False,
        "in_use": False,
        "size": 0,
        "parents": (),
        "created_at": datetime.now(UTC),
        "last_used_at": None,
        "usage_count": 0,
        "description": "",
        "record_type": RecordType.REGULAR,
        "shared": False,
    }
    values.update(fields)
    return UsageInfo(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "position", "name"),
    [
        ("descripton!=x", 0, "descripton"),
        ("id==a, labels.x==y", 7, "labels.x"),
        ("mutable,parnets", 8, "parnets"),
    ],
)
def test_an_unknown_field_is_refused_with_its_position_and_the_valid_ones(
    text: str, position: int, name: str
) -> None:
    with pytest.raises(InvalidError) as caught:
        parse_all(text, fields=FIELDS)
    message = str(caught.value)
    assert f"at position {position}: unknown field {name!r}" in message
    assert "valid fields: id, parents, parent, description" in message


def test_syntax_errors_come_before_field_errors() -> None:
    with pytest.raises(InvalidError, match="position 2: expected"):
        parse_all("a b", fields=FIELDS)


def test_without_fields_anything_goes_as_in_containerd() -> None:
    assert parse_all("whatever!=x").match(_Absent())


class _Absent:
    def field(self, path: object) -> tuple[str, bool]:
        return "", False


def test_parent_is_parents() -> None:
    child = usage(parents=("p1",))
    for text in ("parent==p1", "parents==p1"):
        assert compile_filters([text]).match(child)
        assert not compile_filters([text]).match(usage())


@pytest.mark.parametrize(
    ("strings", "until", "matches"),
    [
        (["until=24h"], timedelta(hours=24), True),
        (["until==90m", "type==internal"], timedelta(minutes=90), False),
        (["until=1h", "until=2h"], timedelta(hours=2), True),
        (["type==regular", " until = 5s "], timedelta(seconds=5), True),
    ],
)
def test_until_is_a_keep_duration_in_a_prune(
    strings: list[str], until: timedelta, matches: bool
) -> None:
    compiled = compile_filters(strings, prune=True)
    assert compiled.until == until
    assert compiled.match(usage()) is matches


def test_until_is_refused_outside_a_prune_and_with_a_bad_duration() -> None:
    with pytest.raises(InvalidError, match="only to a prune"):
        compile_filters(["until=24h"])
    with pytest.raises(InvalidError, match="invalid duration"):
        compile_filters(["until=tomorrow"], prune=True)
    with pytest.raises(InvalidError, match="unknown field 'until'"):
        compile_filters(["until==24h,type==regular"], prune=True)
