"""Streams over other streams and over iterators of chunks."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["ChunkReader", "ChunkWriter", "CountingReader"]


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


class ChunkReader(io.RawIOBase):
    """Reads the concatenation of `chunks`, without copying a chunk more than once."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._chunks = iter(chunks)
        self._rest = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._rest = memoryview(chunk)
        n = min(len(buffer), len(self._rest))
        buffer[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


class ChunkWriter(io.RawIOBase):
    """Hands every write to `put` as a chunk of its own."""

    def __init__(self, put: Callable[[bytes], None]) -> None:
        super().__init__()
        self._put = put

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        view = memoryview(data)
        self._put(view.tobytes())
        return view.nbytes
