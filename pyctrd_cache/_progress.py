"""Human units and the command line's progress bar.

Sizes are shown as BuildKit's `buildctl` shows them (docker/go-units `HumanSize`: decimal
units, four significant digits) and ages as go-units `HumanDuration` words.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, TextIO

from .remote import ProgressCallback, ProgressEvent

__all__ = [
    "PROGRESS_MODES",
    "PlainProgress",
    "ProgressBar",
    "human_duration",
    "human_size",
    "progress_bar",
]

_DECIMAL_UNITS: Final = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
_REDRAW_INTERVAL: Final = 0.1


def human_size(size: float) -> str:
    """`12.35MB`: decimal units, four significant digits (go-units `HumanSize`)."""
    unit = 0
    while size >= 1000 and unit < len(_DECIMAL_UNITS) - 1:
        size /= 1000
        unit += 1
    return f"{size:.4g}{_DECIMAL_UNITS[unit]}"


def human_duration(age: timedelta) -> str:
    """`2 hours`, `About a minute`, `3 weeks` (go-units `HumanDuration`)."""
    seconds = int(age.total_seconds())
    if seconds < 1:
        return "Less than a second"
    if seconds == 1:
        return "1 second"
    if seconds < 60:
        return f"{seconds} seconds"
    minutes = seconds // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(age.total_seconds() / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // (24 * 30)} months"
    return f"{seconds // 3600 // 24 // 365} years"


def short_digest(digest: str) -> str:
    """`sha256:0123456789ab`: the algorithm and the first 12 hex digits."""
    algorithm, sep, hex_digest = digest.partition(":")
    return f"{algorithm}:{hex_digest[:12]}" if sep else digest[:12]


@dataclass
class _Blob:
    label: str
    current: int = 0
    total: int = 0


class ProgressBar:
    """A `ProgressEvent` callback that keeps one live line on a terminal.

    The live line, rewritten with `\\r`, shows the blob that progressed last (or a `status`
    step); each blob's line is written once more and ended by a newline when its `end` event
    arrives. A blob is named by its short digest, or by the event's message when it has no
    digest. Safe to call from several threads; `close` ends a live line.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._mu = threading.Lock()
        self._blobs: dict[str, _Blob] = {}
        self._width = 0
        """Length of the live line; 0 when none is on the screen."""
        self._drawn_at = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        label = short_digest(event.digest) if event.digest else event.message
        with self._mu:
            now = time.monotonic()
            if event.kind == "status":
                step = event.message.replace(event.digest, "").strip() if event.digest else ""
                self._draw(f"{label}  {step}".rstrip())
                self._drawn_at = now
                return
            blob = self._blobs.setdefault(event.digest, _Blob(label))
            blob.total = event.total or blob.total
            if event.kind == "end":
                del self._blobs[event.digest]
                self._draw(_final_line(blob, event))
                self._stream.write("\n")
                self._stream.flush()
                self._width = 0
                return
            if event.kind == "bytes":
                blob.current = event.current
                finished = blob.total and blob.current >= blob.total
                if now - self._drawn_at < _REDRAW_INTERVAL and not finished:
                    return
            self._draw(_line(blob))
            self._drawn_at = now

    def _draw(self, line: str) -> None:
        """Rewrites the live line; the lock is held."""
        padding = " " * max(0, self._width - len(line))
        self._stream.write(f"\r{line}{padding}")
        self._stream.flush()
        self._width = len(line)

    def close(self) -> None:
        """Ends the live line, if any, with a newline."""
        with self._mu:
            if self._width:
                self._stream.write("\n")
                self._stream.flush()
            self._width = 0


def _line(blob: _Blob) -> str:
    if blob.total:
        percent = min(100, blob.current * 100 // blob.total)
        done = f"{human_size(blob.current)} / {human_size(blob.total)}"
        return f"{blob.label}  {done}  {percent:3d}%"
    return f"{blob.label}  {human_size(blob.current)}"


def _final_line(blob: _Blob, event: ProgressEvent) -> str:
    if event.error is not None:
        return f"{blob.label}  failed"
    done = blob.total or max(blob.current, event.current)
    return f"{blob.label}  done {human_size(done)}"


class PlainProgress:
    """A `ProgressEvent` callback for logs: one line per blob when it starts, at most one per
    `interval` seconds while it moves, and one when it ends (size, time and mean rate), and
    one per named step. Never rewrites a line. Safe to call from several threads."""

    def __init__(self, stream: TextIO, interval: float = 10.0) -> None:
        self._stream = stream
        self._interval = interval
        self._mu = threading.Lock()
        self._started: dict[str, float] = {}
        self._written_at: dict[str, float] = {}

    def __call__(self, event: ProgressEvent) -> None:
        label = short_digest(event.digest) if event.digest else event.message
        now = time.monotonic()
        with self._mu:
            if event.kind == "status":
                step = event.message.replace(event.digest, "").strip() if event.digest else ""
                self._write(f"{label}  {step}".rstrip())
            elif event.kind == "start":
                self._started[event.digest] = now
                self._written_at[event.digest] = now
                total = f" ({human_size(event.total)})" if event.total else ""
                self._write(f"{label}  started{total}")
            elif event.kind == "bytes":
                if now - self._written_at.get(event.digest, 0.0) < self._interval:
                    return
                self._written_at[event.digest] = now
                started = self._started.setdefault(event.digest, now)
                self._write(f"{label}  {_amount(event)}  {_rate(event.current, now - started)}")
            else:
                started = self._started.pop(event.digest, now)
                self._written_at.pop(event.digest, None)
                elapsed = now - started
                if event.error is not None:
                    self._write(f"{label}  failed after {elapsed:.1f}s: {event.error}")
                    return
                done = event.total or event.current
                self._write(
                    f"{label}  done {human_size(done)} in {elapsed:.1f}s  {_rate(done, elapsed)}"
                )

    def _write(self, line: str) -> None:
        """Writes one line; the lock is held."""
        self._stream.write(line + "\n")
        self._stream.flush()


def _amount(event: ProgressEvent) -> str:
    if event.total:
        return f"{human_size(event.current)} / {human_size(event.total)}"
    return human_size(event.current)


def _rate(size: int, seconds: float) -> str:
    return f"{human_size(size / seconds)}/s" if seconds > 0 else ""


PROGRESS_MODES: Final = ("auto", "tty", "plain", "quiet")


@contextlib.contextmanager
def progress_bar(stream: TextIO, mode: str = "auto") -> Iterator[ProgressCallback | None]:
    """The progress callback of `mode`: `tty` a `ProgressBar` on `stream`, `plain` a
    `PlainProgress` on it, `quiet` None (nothing is shown); `auto` is `tty` when `stream` is
    a terminal, else `plain`."""
    if mode == "auto":
        mode = "tty" if stream.isatty() else "plain"
    if mode == "quiet":
        yield None
        return
    if mode == "plain":
        yield PlainProgress(stream)
        return
    bar = ProgressBar(stream)
    try:
        yield bar
    finally:
        bar.close()
