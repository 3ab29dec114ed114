"""Mount helpers shared by records and blobs."""

from __future__ import annotations

from .client import Mount

__all__ = ["readonly_mounts"]


def readonly_mounts(mounts: list[Mount]) -> list[Mount]:
    """The same mounts, read-only: an overlay's upperdir moves to the front of its lowerdir
    and its workdir goes; any other mount gets `ro` instead of `rw`."""
    out = []
    for m in mounts:
        if m.type == "overlay":
            out.append(Mount(m.type, m.source, _readonly_overlay(m.options), m.target))
        else:
            options = (*(o for o in m.options if o not in ("rw", "ro")), "ro")
            out.append(Mount(m.type, m.source, options, m.target))
    return out


def _readonly_overlay(options: tuple[str, ...]) -> tuple[str, ...]:
    upper = next((o.removeprefix("upperdir=") for o in options if o.startswith("upperdir=")), "")
    out = []
    for o in options:
        if o.startswith(("upperdir=", "workdir=")):
            continue
        if upper and o.startswith("lowerdir="):
            o = f"lowerdir={upper}:{o.removeprefix('lowerdir=')}"
        out.append(o)
    return tuple(out)
