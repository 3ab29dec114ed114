"""containerd's filter syntax: what parses, what matches, and where malformed input fails.

The cases follow containerd's own `pkg/filters` tests and scanner where they pin behaviour.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from pyctrd_cache.errors import InvalidError
from pyctrd_cache.filters import Adaptor, Filter, adapt, parse, parse_all


@dataclass(frozen=True)
class Record:
    """An object with a name, an optional `other` and labels, as containerd's test corpus."""

    name: str
    other: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def field(self, path: Sequence[str]) -> tuple[str, bool]:
        match path[0]:
            case "name":
                return self.name, bool(self.name)
            case "other":
                return self.other, bool(self.other)
            case "labels" if len(path) > 1:
                key = ".".join(path[1:])
                return self.labels.get(key, ""), key in self.labels
        return "", False


CORPUS = [
    Record("foo", labels={"foo": "true"}),
    Record("bar"),
    Record("foo", labels={"foo": "present", "more complex label": "present"}),
    Record("bar", labels={"bar": "true"}),
    Record("fooer", labels={'more complex label with \\ and "': "present"}),
    Record("fooer", labels={'more complex label with \\ and ".post': "present"}),
    Record("baz", other="too complex, yo"),
    Record("bazo", other="abc"),
    Record("compound", labels={"foo": "omg_asdf.asdf-qwer"}),
    Record("gc", labels={"containerd.io/gc.root": "2024-01-01"}),
    Record("eq", other="a=b,c"),
    Record("e\u0301", labels={"café": "é"}),
]


def matching(filter_: Filter) -> list[int]:
    return [index for index, record in enumerate(CORPUS) if filter_.match(record)]


def test_records_are_adaptors() -> None:
    adaptor: Adaptor = CORPUS[0]
    assert adaptor.field(["labels", "foo"]) == ("true", True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("name", list(range(len(CORPUS))), id="present"),
        pytest.param("labels.foo", [0, 2, 8], id="label-present"),
        pytest.param("other", [6, 7, 10], id="other-present"),
        pytest.param("name==bar", [1, 3], id="equal"),
        pytest.param("labels.foo==true", [0], id="label-equal"),
        pytest.param("name!=bar", [0, 2, 4, 5, 6, 7, 8, 9, 10, 11], id="not-equal"),
        # `!=` compares the value alone, so records without the label match too.
        pytest.param(
            "labels.foo!=true", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], id="not-equal-absent"
        ),
        pytest.param('labels.foo!=""', [0, 2, 8], id="not-equal-empty"),
        pytest.param("other~=[abc]+", [6, 7, 10], id="regexp"),
        pytest.param("name~=oo", [0, 2, 4, 5], id="regexp-searches"),
        pytest.param("name~=^ba", [1, 3, 6, 7], id="regexp-anchored"),
        pytest.param("name~=z$", [6], id="regexp-end-anchored"),
        # `~=` does not look at presence: an absent field's value "" is searched.
        pytest.param("other~=^$", [0, 1, 2, 3, 4, 5, 8, 9, 11], id="regexp-absent"),
        pytest.param(r"labels.foo~=\.", [8], id="regexp-bare-backslash"),
    ],
)
def test_operators(text: str, expected: list[int]) -> None:
    assert matching(parse(text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("labels.foo,name", [0, 2, 8], id="present-and-present"),
        pytest.param("name==bar,labels.bar", [3], id="equal-and-present"),
        pytest.param("name==bar,labels.bar==true", [3], id="equal-and-equal"),
        pytest.param("name==bar,labels.bar==wrong", [], id="no-match"),
        pytest.param("other~=[abc]+,name!=foo,name!=baz", [7, 10], id="three"),
        pytest.param("name==foo,name==bar", [], id="contradiction"),
    ],
)
def test_selectors_in_one_string_are_anded(text: str, expected: list[int]) -> None:
    assert matching(parse(text)) == expected


def test_strings_are_ored() -> None:
    assert matching(parse_all("name==foo", "name==bar")) == [0, 1, 2, 3]
    assert matching(parse_all("name==bar,labels.bar", "labels.foo==true")) == [0, 3]
    assert matching(parse_all("name==nothing")) == []
    assert matching(parse_all("name==x", "name==y")) == []


@pytest.mark.parametrize(
    "filter_",
    [
        pytest.param(parse(""), id="parse-empty"),
        pytest.param(parse_all(), id="parse-all-nothing"),
        pytest.param(parse_all(""), id="parse-all-empty"),
        pytest.param(parse_all("", ""), id="parse-all-empties"),
        # containerd ORs the empty filter's "always" with the rest: everything matches.
        pytest.param(parse_all("name==nothing", ""), id="parse-all-with-empty"),
    ],
)
def test_empty_filters_match_everything(filter_: Filter) -> None:
    assert matching(filter_) == list(range(len(CORPUS)))
    assert filter_.match(adapt({}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('name==foo,labels."more complex label"', [2], id="quoted-field"),
        pytest.param(r'labels."more complex label with \\ and \""==present', [4], id="escapes"),
        pytest.param(
            r'labels."more complex label with \\ and \"".post==present', [5], id="quoted-then-bare"
        ),
        pytest.param('labels."containerd.io/gc.root"', [9], id="containerd-label"),
        pytest.param('labels."containerd.io/gc.root"==2024-01-01', [9], id="containerd-label-eq"),
        pytest.param('other=="too complex, yo"', [6], id="quoted-value-comma"),
        pytest.param('other=="a=b,c"', [10], id="quoted-value-comma-equals"),
        pytest.param('"name"=="bar"', [1, 3], id="everything-quoted"),
        pytest.param('name==""', [], id="empty-quoted-value"),
        pytest.param(r'labels."caf\u00e9"=="\xc3\xa9"', [11], id="unicode-and-byte-escapes"),
        pytest.param(r'labels."caf\303\251"', [11], id="octal-escapes"),
    ],
)
def test_quoting(text: str, expected: list[int]) -> None:
    assert matching(parse(text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("other~=/[abc]+/,name!=foo", [6, 7, 10], id="slash-quoted"),
        pytest.param("other~=|[abc]{1,2}|,name!=foo", [6, 7, 10], id="pipe-quoted-with-comma"),
        pytest.param('other~="^a=b,"', [10], id="double-quoted"),
        pytest.param(r"labels.foo~=/asdf\/asdf|\\.asdf-/", [8], id="escaped-slash"),
        pytest.param(r"labels.foo~=|^t\|_a|", [0, 8], id="escaped-pipe"),
        pytest.param(r'other~=/[abc]{0,1}"\//,name!=foo', [], id="garbage-but-valid"),
        pytest.param("name~=é|^e\u0301$", [11], id="unicode"),
    ],
)
def test_quoted_regexps(text: str, expected: list[int]) -> None:
    assert matching(parse(text)) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        pytest.param("v==omg_asdf.asdf-qwer", "omg_asdf.asdf-qwer", id="punctuated"),
        pytest.param("v==a=b", "a=b", id="equals-inside"),
        pytest.param("v==a/b|c", "a/b|c", id="slash-and-pipe-inside"),
        pytest.param('v==a"b', 'a"b', id="double-quote-inside"),
        pytest.param("v=='x'", "'x'", id="single-quotes-are-not-quotes"),
        pytest.param("v==-1", "-1", id="leading-dash"),
        pytest.param("v==<>", "<>", id="angle-brackets"),
        pytest.param("v==牛", "牛", id="non-ascii"),
        pytest.param('v=="\\t\\n\\a\\x41\\101\\u00e9\\U0001F600"', "\t\n\aAAé😀", id="escapes"),
        pytest.param('v=="\\ud800"', "\ufffd", id="surrogate-escape-becomes-replacement"),
        pytest.param("  v  ==  x", "x", id="whitespace-before-tokens"),
        pytest.param("v==\tx", "x", id="tab"),
    ],
)
def test_values(text: str, value: str) -> None:
    filter_ = parse(text)
    assert filter_.match(adapt({"v": (value, True)}))
    assert not filter_.match(adapt({"v": (value + "!", True)}))
    assert not filter_.match(adapt({}))


def test_whitespace_after_a_comma_and_a_dot_is_skipped() -> None:
    assert matching(parse("name==bar,  labels.\tbar")) == [3]
    assert matching(parse("name ==bar, labels. bar == true")) == [3]


def test_multi_segment_paths_reach_the_adaptor_whole() -> None:
    seen: list[tuple[str, ...]] = []

    class Recording:
        def field(self, path: Sequence[str]) -> tuple[str, bool]:
            seen.append(tuple(path))
            return "", False

    parse('a.b."c.d".e_1.2==x,f').match(Recording())
    assert seen == [("a", "b", "c.d", "e_1", "2")]  # the AND stops at the first miss


def test_adapt_answers_single_names() -> None:
    adaptor = adapt({"id": ("sha256:abc", True), "parent": ("", False)})
    assert adaptor.field(["id"]) == ("sha256:abc", True)
    assert adaptor.field(["parent"]) == ("", False)
    assert adaptor.field(["missing"]) == ("", False)
    assert adaptor.field(["id", "more"]) == ("", False)
    assert adaptor.field([]) == ("", False)
    assert parse("id~=^sha256:").match(adaptor)
    assert parse("id,parent!=x").match(adaptor)
    assert not parse("id,parent").match(adaptor)
    assert not parse("id.more").match(adaptor)


def test_presence_uses_the_flag_not_the_value() -> None:
    assert parse("v").match(adapt({"v": ("", True)}))
    assert not parse("v").match(adapt({"v": ("x", False)}))
    assert not parse("v==x").match(adapt({"v": ("x", False)}))
    # `!=` and `~=` look only at the value, as containerd's do.
    assert not parse("v!=x").match(adapt({"v": ("x", False)}))
    assert parse("v~=x").match(adapt({"v": ("x", False)}))


def test_error_message_names_the_filter_position_and_expectation() -> None:
    with pytest.raises(InvalidError) as caught:
        parse("id==a,,b")
    assert str(caught.value) == "invalid filter 'id==a,,b' at position 6: expected a field name"


@pytest.mark.parametrize(
    ("text", "position", "expected"),
    [
        # empty selectors
        pytest.param("id==a,,b", 6, "expected a field name", id="empty-selector"),
        pytest.param(",name", 0, "expected a field name", id="leading-comma"),
        pytest.param("name==foo,", 10, "expected a field name", id="trailing-comma"),
        pytest.param("labels.", 7, "expected a field name", id="trailing-dot"),
        pytest.param("labels..foo", 7, "expected a field name", id="double-dot"),
        pytest.param("   ", 3, "expected a field name", id="only-whitespace"),
        pytest.param("==x", 0, "expected a field name", id="no-field"),
        pytest.param('labels.?"x".post==present', 7, "expected a field name", id="bad-field-char"),
        pytest.param("labels.café", 10, "expected an operator", id="non-ascii-field"),
        # operators
        pytest.param("name<foo", 4, "expected an operator", id="less-than"),
        pytest.param("name>foo", 4, "expected an operator", id="greater-than"),
        pytest.param("name<=foo", 4, "expected an operator", id="less-equal"),
        pytest.param("name>=foo", 4, "expected an operator", id="greater-equal"),
        pytest.param("name=foo", 4, "not '='", id="single-equals"),
        pytest.param("name===foo", 4, "not '==='", id="triple-equals"),
        pytest.param("name!foo", 4, "not '!'", id="bang"),
        pytest.param("name=~foo", 4, "not '=~'", id="reversed-match"),
        pytest.param("labels.foo-bar", 10, "expected an operator", id="dash-in-field"),
        pytest.param('name"x"', 4, "expected an operator", id="quoted-after-field"),
        pytest.param("name ,x", 5, "expected an operator", id="space-before-comma"),
        pytest.param("name ", 5, "expected an operator", id="trailing-space-after-field"),
        # values
        pytest.param("name==", 6, "expected a value", id="missing-value"),
        pytest.param("name== ", 7, "expected a value", id="missing-value-space"),
        pytest.param("image~=,id==x", 7, "expected a value", id="missing-value-comma"),
        pytest.param("name==.5", 6, "expected a value", id="value-starting-with-dot"),
        pytest.param("name==!x", 4, "not '==!'", id="operator-swallows-bang"),
        pytest.param("name== !x", 7, "expected a value", id="value-starting-with-bang"),
        pytest.param("name==/foo/", 6, "quotes only a '~=' regexp", id="slash-quoted-equal"),
        pytest.param("name!=|foo|", 6, "quotes only a '~=' regexp", id="pipe-quoted-not"),
        pytest.param("labels.|foo|==x", 7, "quotes only a '~=' regexp", id="pipe-field"),
        # what may follow a selector
        pytest.param("name==foo bar", 9, "expected ',' or the end", id="two-values"),
        pytest.param("name==foo ", 9, "expected ',' or the end", id="trailing-space"),
        pytest.param("name==foo ,x", 9, "expected ',' or the end", id="space-then-comma"),
        pytest.param('name=="foo"bar', 11, "expected ',' or the end", id="after-quoted"),
        # quoting
        pytest.param('labels."unterminated', 7, "expected a closing '\"'", id="unterminated"),
        pytest.param('name=="abc', 6, "expected a closing '\"'", id="unterminated-value"),
        pytest.param("name~=/abc", 6, "expected a closing '/'", id="unterminated-regexp"),
        pytest.param('labels."a\nb"==x', 7, "expected a closing '\"'", id="newline-in-quotes"),
        pytest.param("labels.ns/key==value", 9, "expected a closing '/'", id="slash-in-field"),
        pytest.param("labels.key==/value", 12, "expected a closing '/'", id="slash-value"),
        pytest.param(r'labels."\g"', 7, r"not '\g'", id="illegal-escape"),
        pytest.param(r'labels."\'"', 7, r"not '\''", id="single-quote-escape"),
        pytest.param(r'name=="a\/b"', 6, r"not '\/'", id="slash-escape-in-double-quotes"),
        pytest.param(r"name~=/\d+/", 6, r"not '\d'", id="regexp-escape-in-slashes"),
        pytest.param(r'labels."\xaz"', 7, "expected hex digits", id="short-hex"),
        pytest.param(r'labels."\12"', 7, "expected octal digits", id="short-octal"),
        pytest.param(r'labels."\777"', 7, "expected a byte", id="octal-too-big"),
        pytest.param(r'labels."\U00110000"', 7, "expected a code point", id="beyond-unicode"),
        # characters containerd's scanner refuses anywhere
        pytest.param("foo\x00bar", 3, "unexpected NUL", id="nul"),
        pytest.param('name=="a\x00"', 6, "unexpected NUL", id="nul-in-quotes"),
        pytest.param("name==\ufffd", 6, "unexpected character", id="replacement-character"),
        # regular expressions
        pytest.param("name~=(", 6, "expected a regular expression", id="bad-regexp"),
        pytest.param("name~=/[a-/", 6, "expected a regular expression", id="bad-quoted-regexp"),
        pytest.param("name~=a{4294967296}", 6, "too large", id="huge-repetition"),
        pytest.param("name==x,other~=*a", 15, "expected a regular expression", id="bad-second"),
    ],
)
def test_malformed(text: str, position: int, expected: str) -> None:
    prefix = f"invalid filter {text!r} at position {position}: "
    with pytest.raises(InvalidError, match=re.escape(prefix)) as caught:
        parse(text)
    assert expected in str(caught.value)


def test_parse_all_reports_the_malformed_string() -> None:
    with pytest.raises(InvalidError, match=re.escape("invalid filter 'name<x' at position 4")):
        parse_all("name==ok", "", "name<x")
