"""containerd's filter syntax: parse filter strings and match objects against them.

The grammar is the one containerd's `filters` package accepts (and the `filters` field of
its List requests carries)::

    filter    := selector ("," selector)*         every selector must match (AND)
    selector  := fieldpath [operator value]       no operator: the field must be present
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_]+ | "quoted"
    operator  := "==" | "!=" | "~="
    value     := bare | "quoted"                  a "~=" value may also be /quoted/ or |quoted|

Several filter strings are ORed by `parse_all`. The details follow containerd's scanner
rather than the grammar above, including its surprises:

* Quoted strings use Go's escapes (`\\n`, `\\t`, `\\xNN`, `\\NNN` octal, `\\uNNNN`,
  `\\UNNNNNNNN`, and the quote character itself); any other escape is an error, so a regexp
  quoted with `/` must double its backslashes (`/\\\\d+/`), while a bare one need not (`\\d+`).
  `\\x` and octal escapes are bytes, joined into UTF-8 like Go strings.
* Single quotes are not quotes: `name=='x'` compares with the three characters `'x'`.
* A bare value is everything up to a `,`, whitespace or a control character, so it may
  contain `=`, `.`, `/` or `"`, but it cannot start with `"`, `/`, `|`, `,`, `.`, `=`, `!`
  or `~`: quote such a value.
* Whitespace may precede any token, but nothing may follow a selector except `,` or the
  end of the string: `name==a , b` and a trailing space are errors.
* `!=` matches when the value differs, which includes an absent field (its value is "");
  `~=` searches the value without looking at presence, so `labels.x~=^$` matches objects
  without the label.
* The empty string matches everything, so `parse_all("name==a", "")` matches everything.

Regular expressions are Python's `re` dialect, used with `re.search` (Go's `MatchString`
also searches, unanchored). containerd compiles them lazily and treats a bad one as matching
nothing; here a bad one is an `InvalidError` at parse time. Where the dialects differ
(`\\p{L}`, `\\z`, `[[:alpha:]]` are RE2 only) a pattern fails here or means something else.
Positions in error messages are 0-based indexes into the Python string (containerd counts
UTF-8 bytes).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

from pyctrd_cache.errors import InvalidError

__all__ = ["Adaptor", "Filter", "adapt", "parse", "parse_all"]


class Adaptor(Protocol):
    """Answers a field path for one object: its value and whether the field is present.

    An absent field should answer ("", False): `!=` and `~=` compare the value alone.
    """

    def field(self, path: Sequence[str]) -> tuple[str, bool]: ...


class Filter(Protocol):
    """A parsed filter."""

    def match(self, adaptor: Adaptor) -> bool: ...


class _Op(Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


_OPERATORS: Final = {op.value: op for op in (_Op.EQUAL, _Op.NOT_EQUAL, _Op.MATCHES)}


@dataclass(frozen=True)
class _Always:
    def match(self, adaptor: Adaptor) -> bool:
        return True


_ALWAYS: Final = _Always()


@dataclass(frozen=True)
class _Selector:
    path: tuple[str, ...]
    op: _Op
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor.field(self.path)
        match self.op:
            case _Op.PRESENT:
                return present
            case _Op.EQUAL:
                return present and value == self.value
            case _Op.NOT_EQUAL:
                return value != self.value
            case _Op.MATCHES:
                return self.pattern is not None and self.pattern.search(value) is not None


@dataclass(frozen=True)
class _All:
    selectors: tuple[_Selector, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(selector.match(adaptor) for selector in self.selectors)


@dataclass(frozen=True)
class _Any:
    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return any(one.match(adaptor) for one in self.filters)


class _MappingAdaptor:
    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, tuple[str, bool]]) -> None:
        self._fields = fields

    def field(self, path: Sequence[str]) -> tuple[str, bool]:
        if len(path) != 1:
            return "", False
        return self._fields.get(path[0], ("", False))

    def __repr__(self) -> str:
        return f"adapt({dict(self._fields)!r})"


def adapt(fields: Mapping[str, tuple[str, bool]]) -> Adaptor:
    """An adaptor answering single-name paths from `fields`; anything else is absent."""
    return _MappingAdaptor(fields)


def parse(filter_string: str, *, fields: Collection[str] | None = None) -> Filter:
    """The filter for one string: all its selectors must match. "" matches everything.

    With `fields`, a field path (dotted) outside them is refused: containerd would match it
    as absent, so `name!=x` on a misspelt name would match everything.

    Raises `InvalidError` naming the string, the position and what was expected there.
    """
    if filter_string == "":
        return _ALWAYS
    return _Parser(filter_string, fields).parse()


def parse_all(*filter_strings: str, fields: Collection[str] | None = None) -> Filter:
    """The filter matching when any of the strings does; no strings match everything.

    As in containerd, an empty string among them matches everything too. Every string is
    parsed, so a malformed one (or, with `fields`, one naming another field) raises
    `InvalidError` either way.
    """
    filters = [parse(one, fields=fields) for one in filter_strings]
    if not filters or any(one is _ALWAYS for one in filters):
        return _ALWAYS
    if len(filters) == 1:
        return filters[0]
    return _Any(tuple(filters))


# --- scanning -------------------------------------------------------------------------

# Go's unicode.IsSpace: the Latin-1 spaces and the rest of Unicode's White_Space property.
_SPACES: Final = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_QUOTES: Final = frozenset('"/|')
_OPERATOR_CHARS: Final = frozenset("=!~")
_SEPARATORS: Final = frozenset(",.")
_FIELD_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_SIMPLE_ESCAPES: Final = {
    "a": b"\a",
    "b": b"\b",
    "f": b"\f",
    "n": b"\n",
    "r": b"\r",
    "t": b"\t",
    "v": b"\v",
    "\\": b"\\",
}
# Escape letter -> (base, digits); an octal escape starts with its first digit.
_NUMERIC_ESCAPES: Final = {"x": (16, 2), "u": (16, 4), "U": (16, 8)} | dict.fromkeys(
    "01234567", (8, 3)
)
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
_OCTAL_DIGITS: Final = frozenset("01234567")


def _illegal(char: str) -> str:
    """Why containerd's scanner rejects `char` anywhere, or "" if it does not."""
    if char == "\0":
        return "unexpected NUL character"
    # Go decodes these (and invalid UTF-8, which a str cannot hold) as RuneError.
    if char == "\ufffd" or "\ud800" <= char <= "\udfff":
        return f"unexpected character {char!r}"
    return ""


def _is_value_char(char: str) -> bool:
    """A character that continues a bare value: Go's graphic characters but `,` and spaces."""
    if char == "," or char in _SPACES or _illegal(char):
        return False
    return unicodedata.category(char)[0] in "LMNPS"


class _Kind(Enum):
    END = "the end of the filter"
    FIELD = "a field name"
    VALUE = "a value"
    QUOTED = "a quoted string"
    SEPARATOR = "a separator"
    OPERATOR = "an operator"
    OTHER = "another character"


@dataclass(frozen=True)
class _Token:
    kind: _Kind
    start: int
    text: str


class _Parser:
    def __init__(self, text: str, fields: Collection[str] | None = None) -> None:
        self.text = text
        self.fields = fields
        self.pos = 0
        # The position and dotted name of each field path, checked once the syntax is.
        self.paths: list[tuple[int, str]] = []

    def error(self, pos: int, problem: str) -> InvalidError:
        return InvalidError(f"invalid filter {self.text!r} at position {pos}: {problem}")

    def peek(self) -> str:
        """The next character, without skipping whitespace; "" at the end."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> _All:
        selectors = [self.selector()]
        while char := self.peek():
            if char != ",":
                raise self.error(self.pos, f"expected ',' or the end of the filter, not {char!r}")
            self.pos += 1
            selectors.append(self.selector())
        for start, name in self.paths:
            if self.fields is not None and name not in self.fields:
                raise self.error(
                    start, f"unknown field {name!r} (valid fields: {', '.join(self.fields)})"
                )
        return _All(tuple(selectors))

    def selector(self) -> _Selector:
        start = self.pos
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        while self.text[start] in _SPACES:
            start += 1
        self.paths.append((start, ".".join(path)))
        if self.peek() in ("", ","):
            return _Selector(tuple(path), _Op.PRESENT)
        op = self.operator()
        token = self.scan(value=True)
        if token.kind is _Kind.VALUE:
            value = token.text
        elif token.kind is _Kind.QUOTED and (op is _Op.MATCHES or token.text[0] == '"'):
            value = self.unquote(token)
        elif token.kind is _Kind.QUOTED:
            raise self.error(
                token.start,
                f"expected a value ({token.text[0]!r} quotes only a '~=' regexp; use '\"')",
            )
        else:
            raise self.error(token.start, "expected a value")
        if op is not _Op.MATCHES:
            return _Selector(tuple(path), op, value)
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise self.error(token.start, f"expected a regular expression ({exc.msg})") from exc
        except OverflowError as exc:  # a repetition count beyond what re can hold
            raise self.error(token.start, f"expected a regular expression ({exc})") from exc
        return _Selector(tuple(path), op, value, pattern)

    def field(self) -> str:
        token = self.scan(value=False)
        if token.kind is _Kind.FIELD:
            return token.text
        if token.kind is _Kind.QUOTED and token.text[0] == '"':
            return self.unquote(token)
        if token.kind is _Kind.QUOTED:
            raise self.error(
                token.start,
                f"expected a field name ({token.text[0]!r} quotes only a '~=' regexp; use '\"')",
            )
        raise self.error(token.start, "expected a field name")

    def operator(self) -> _Op:
        token = self.scan(value=False)
        expected = "expected an operator ('==', '!=' or '~=')"
        if token.kind is not _Kind.OPERATOR:
            raise self.error(token.start, expected)
        op = _OPERATORS.get(token.text)
        if op is None:
            raise self.error(token.start, f"{expected}, not {token.text!r}")
        return op

    def scan(self, *, value: bool) -> _Token:
        """The next token after any whitespace; `value` right after an operator."""
        text, end = self.text, len(self.text)
        start = self.pos
        while start < end and text[start] in _SPACES:
            start += 1
        if start == end:
            self.pos = end
            return _Token(_Kind.END, end, "")
        char = text[start]
        if problem := _illegal(char):
            raise self.error(start, problem)
        stop = start + 1
        if char in _QUOTES:
            kind, stop = _Kind.QUOTED, self.scan_quoted(start)
        elif char in _SEPARATORS:
            kind = _Kind.SEPARATOR
        elif char in _OPERATOR_CHARS:
            kind = _Kind.OPERATOR
            while stop < end and text[stop] in _OPERATOR_CHARS:
                stop += 1
        elif value:
            # The first character is taken whatever it is, as containerd's scanner does.
            kind = _Kind.VALUE
            while stop < end and _is_value_char(text[stop]):
                stop += 1
        elif char in _FIELD_CHARS:
            kind = _Kind.FIELD
            while stop < end and text[stop] in _FIELD_CHARS:
                stop += 1
        else:
            kind = _Kind.OTHER
        self.pos = stop
        return _Token(kind, start, text[start:stop])

    def scan_quoted(self, start: int) -> int:
        """The index after the quoted string opening at `start`; checks its escapes."""
        text, end = self.text, len(self.text)
        quote = text[start]
        problem = ""
        pos = start + 1
        while True:
            char = text[pos] if pos < end else ""
            if char == quote:
                if problem:
                    raise self.error(start, problem)
                return pos + 1
            if not char or char == "\n" or _illegal(char):
                unterminated = f"unterminated quoted string, expected a closing {quote!r}"
                raise self.error(start, problem or _illegal(char) or unterminated)
            pos += 1
            if char != "\\":
                continue
            escape = text[pos] if pos < end else ""
            if escape and (escape in _SIMPLE_ESCAPES or escape == quote):
                pos += 1
            elif escape in _NUMERIC_ESCAPES:
                base, count = _NUMERIC_ESCAPES[escape]
                if base == 16:
                    pos += 1
                digits = _HEX_DIGITS if base == 16 else _OCTAL_DIGITS
                while count and pos < end and text[pos] in digits:
                    pos += 1
                    count -= 1
                if count:
                    kind = "hex" if base == 16 else "octal"
                    problem = problem or f"expected {kind} digits in the escape sequence"
            elif escape and not _illegal(escape):
                problem = problem or f"expected a valid escape sequence, not '\\{escape}'"

    def unquote(self, token: _Token) -> str:
        """The text a quoted token stands for, decoded as Go would."""
        quote, body = token.text[0], token.text[1:-1]
        out = bytearray()
        pos = 0
        while pos < len(body):
            char = body[pos]
            pos += 1
            if char != "\\":
                out += char.encode()
                continue
            escape = body[pos]
            pos += 1
            if escape in _SIMPLE_ESCAPES:
                out += _SIMPLE_ESCAPES[escape]
                continue
            if escape == quote:
                out += escape.encode()
                continue
            base, count = _NUMERIC_ESCAPES[escape]
            if base == 8:
                pos -= 1
            digits = body[pos : pos + count]
            pos += count
            code = int(digits, base)
            if escape in "uU":
                if code > 0x10FFFF:
                    raise self.error(
                        token.start, f"expected a code point, not '\\{escape}{digits}'"
                    )
                # Go encodes a surrogate code point as U+FFFD.
                out += ("\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)).encode()
            elif code > 0xFF:
                raise self.error(token.start, f"expected a byte, not '\\{digits}'")
            else:
                out.append(code)
        return out.decode("utf-8", "surrogateescape")
