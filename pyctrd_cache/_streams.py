"""A readable stream that reports its progress."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["CountingReader"]


class CountingReader(io.RawIOBase):
    """Reads `stream`, calling `on_read` with the total bytes read so far after each read.

    `on_read` may raise to stop the stream (for example when a source sends more than it
    announced).
    """

    def __init__(self, stream: BinaryIO, on_read: Callable[[int], None]) -> None:
        super().__init__()
        self._stream = stream
        self._on_read = on_read
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        if n:
            self.count += n
            self._on_read(self.count)
        return n
