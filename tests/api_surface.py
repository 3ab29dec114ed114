"""The public API as text: every name in `pyctrd_cache.__all__` with its signature, and for
classes every public member the package defines. tests/unit/public_api.txt pins it.

    python -m tests.api_surface            prints the surface
    python -m tests.api_surface --write    rewrites the pinned file after a deliberate change
    python -m tests.api_surface --check    exit 1 when a public name or member has no docstring
"""

from __future__ import annotations

import enum
import inspect
import pathlib
import sys
from typing import Any

import pyctrd_cache

PINNED = pathlib.Path(__file__).resolve().parent / "unit" / "public_api.txt"


def _ours(owner: type) -> bool:
    return owner.__module__.split(".")[0] == "pyctrd_cache"


def _signature(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _members(cls: type) -> list[tuple[str, Any]]:
    """The public members `cls` or one of the package's base classes defines."""
    found = []
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or not _ours(owner):
            continue
        found.append((name, inspect.getattr_static(cls, name)))
    return found


def _describe(name: str, obj: Any) -> list[str]:
    if inspect.isclass(obj):
        bases = ", ".join(b.__name__ for b in obj.__bases__)
        # An enum's call signature is the standard library's, not ours.
        signature = "" if issubclass(obj, enum.Enum) else _signature(obj)
        lines = [f"class {name}({bases}){signature}"]
        for member, value in _members(obj):
            if isinstance(value, property):
                lines.append(f"    {member}: property")
            elif isinstance(value, (staticmethod, classmethod)):
                kind = type(value).__name__
                lines.append(f"    {member}{_signature(value.__func__)}: {kind}")
            elif inspect.isfunction(value):
                lines.append(f"    {member}{_signature(value)}")
            elif isinstance(value, enum.Enum):
                lines.append(f"    {member} = {value.value!r}")
            else:
                lines.append(f"    {member}: attribute")
        return lines
    if callable(obj):
        return [f"def {name}{_signature(obj)}"]
    return [f"{name}: {type(obj).__name__}"]


def surface() -> str:
    """The whole public surface, one line per name or member."""
    lines: list[str] = []
    for name in sorted(pyctrd_cache.__all__):
        if name == "__version__":
            lines.append("__version__: str")
            continue
        lines += _describe(name, getattr(pyctrd_cache, name))
    return "\n".join(lines) + "\n"


def undocumented() -> list[str]:
    """Public names, methods and properties with no docstring (an override may inherit the
    one it overrides), each named once, by the class that defines it."""
    missing: dict[str, None] = {}
    for name in sorted(pyctrd_cache.__all__):
        obj = getattr(pyctrd_cache, name)
        if name == "__version__":
            continue
        if not (inspect.getdoc(obj) or "").strip():
            missing[name] = None
        if not inspect.isclass(obj) or issubclass(obj, enum.Enum):
            continue
        for member, value in _members(obj):
            routine = isinstance(value, (property, staticmethod, classmethod))
            if not (routine or inspect.isfunction(value)):
                continue
            if not (inspect.getdoc(getattr(obj, member)) or "").strip():
                owner = next(k for k in obj.__mro__ if member in vars(k))
                missing[f"{owner.__name__}.{member}"] = None
    return list(missing)


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        PINNED.write_text(surface())
        return 0
    if argv == ["--check"]:
        missing = undocumented()
        for name in missing:
            print(f"api_surface: no docstring: pyctrd_cache.{name}", file=sys.stderr)
        return 1 if missing else 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(surface())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
