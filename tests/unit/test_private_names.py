"""A module's underscore names are its own: no module of the package reads another module's,
except the modules of the cache core (`pyctrd_cache/cache/`), which share theirs
(docs/architecture.md)."""

from __future__ import annotations

import ast
import pathlib

import pyctrd_cache

PACKAGE = pathlib.Path(pyctrd_cache.__file__).resolve().parent
CORE = PACKAGE / "cache"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined(tree: ast.Module) -> set[str]:
    """The underscore names a module defines: functions, classes, module globals, and the
    attributes it assigns (`x._name = ...`) or declares in a class body."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
    return {n for n in names if _private(n)}


def _reads(path: pathlib.Path, tree: ast.Module) -> list[tuple[int, str]]:
    """Underscore names the module reads from elsewhere: `from m import _name` of a module
    of the package, and `x._name` where `x` is not `self` or `cls`."""
    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").startswith("pyctrd_cache")
            reads += [(node.lineno, a.name) for a in node.names if ours and _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            mine = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not mine:
                reads.append((node.lineno, node.attr))
    return reads


def crossings() -> list[str]:
    """Each read of an underscore name that another module of the package defines and the
    reading module (or, in the core, the core) does not."""
    trees = {p: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}
    defined = {p: _defined(t) for p, t in trees.items()}
    core_names = set().union(*(d for p, d in defined.items() if p.is_relative_to(CORE)))
    found = []
    for path, tree in trees.items():
        own = core_names if path.is_relative_to(CORE) else defined[path]
        for lineno, name in _reads(path, tree):
            if name in own:
                continue
            owners = [p for p, d in defined.items() if p != path and name in d]
            if owners:
                found.append(
                    f"{path.relative_to(PACKAGE.parent)}:{lineno} reads {name} of "
                    + ", ".join(str(p.relative_to(PACKAGE.parent)) for p in owners)
                )
    return found


def test_no_module_reads_another_modules_underscore_names() -> None:
    assert crossings() == []


def test_the_check_sees_a_crossing(tmp_path: pathlib.Path) -> None:
    tree = ast.parse("from .refs import _Record\nx = cm._client\nself._mine = 1\n")
    assert _reads(tmp_path / "m.py", tree) == [(1, "_Record"), (2, "_client")]
    assert _defined(tree) == {"_mine"}


def test_the_core_exports_nothing_public() -> None:
    import pyctrd_cache.cache

    assert pyctrd_cache.cache.__all__ == []
