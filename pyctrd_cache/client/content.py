"""The Content service: blobs by digest, streamed both ways, and their labels."""

from __future__ import annotations

import builtins
import collections
import io
import queue
import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from types import TracebackType
from typing import BinaryIO, Final

from google.protobuf.empty_pb2 import Empty
from google.protobuf.field_mask_pb2 import FieldMask

from containerd_api.services.content.v1 import content_pb2 as pb

from ..errors import AlreadyExistsError, InvalidError, NotFoundError
from ._convert import label_paths
from ._transport import Transient, Transport, to_datetime
from .types import ContentInfo, IngestStatus, frozen_labels

SERVICE = "containerd.services.content.v1.Content"
CHUNK: Final = 1 << 20
"""Bytes per write message; containerd's own client uses the same."""
WINDOW: Final = 8
"""Write messages sent ahead of containerd's replies: one reply per message would hold a
writer to one message per round trip."""


def _info(info: pb.Info) -> ContentInfo:
    return ContentInfo(
        digest=info.digest,
        size=info.size,
        created_at=to_datetime(info.created_at),
        updated_at=to_datetime(info.updated_at),
        labels=frozen_labels(info.labels),
    )


def _status(s: pb.Status) -> IngestStatus:
    return IngestStatus(
        ref=s.ref,
        offset=s.offset,
        total=s.total,
        expected=s.expected,
        started_at=to_datetime(s.started_at),
        updated_at=to_datetime(s.updated_at),
    )


class ContentService:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def info(self, digest: str) -> ContentInfo:
        req = pb.InfoRequest(digest=digest)
        return _info(self._t.unary(SERVICE, "Info", req, pb.InfoResponse, idempotent=True).info)

    def update_labels(
        self, digest: str, labels: Mapping[str, str], *, fields: Iterable[str] | None = None
    ) -> ContentInfo:
        """Sets the labels named in `fields` (default: every key of `labels`) on a blob.

        A named label that is missing from `labels` or empty is removed.
        """
        req = pb.UpdateRequest(
            info=pb.Info(digest=digest, labels=dict(labels)),
            update_mask=FieldMask(paths=label_paths(labels, fields)),
        )
        return _info(self._t.unary(SERVICE, "Update", req, pb.UpdateResponse, idempotent=True).info)

    def list(self, *filters: str) -> list[ContentInfo]:
        """Blobs matching any of `filters` (`digest==`, `labels."k"==v`, ...), or all."""
        req = pb.ListContentRequest(filters=list(filters))
        return [
            _info(i)
            for batch in self._t.collect(SERVICE, "List", req, pb.ListContentResponse)
            for i in batch.info
        ]

    def walk(self, *filters: str) -> Iterator[ContentInfo]:
        """Like `list`, streamed batch by batch (a broken stream is not restarted)."""
        req = pb.ListContentRequest(filters=list(filters))
        for batch in self._t.server_stream(SERVICE, "List", req, pb.ListContentResponse, long=True):
            yield from (_info(i) for i in batch.info)

    def delete(self, digest: str) -> None:
        req = pb.DeleteContentRequest(digest=digest)
        self._t.unary(SERVICE, "Delete", req, Empty, idempotent=True, missing_ok_on_retry=True)

    def read(self, digest: str, *, offset: int = 0, size: int = 0) -> Generator[bytes, None, None]:
        """The blob's bytes from `offset` (`size` 0: to the end), in chunks of at most 1 MiB.

        A stream broken by an unavailable daemon is reopened at the byte it stopped at,
        within the retry budget.
        """
        position = offset
        end = offset + size if size > 0 else 0
        first_failure = 0.0
        delay = 0.05
        while True:
            req = pb.ReadContentRequest(
                digest=digest, offset=position, size=end - position if end else 0
            )
            try:
                for res in self._t.server_stream(
                    SERVICE, "Read", req, pb.ReadContentResponse, long=True
                ):
                    position += len(res.data)
                    yield res.data
                return
            except Transient as t:
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure > self._t.retry_budget:
                    raise self._t.unavailable("Content.Read", t.err) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def open(self, digest: str) -> ContentReader:
        """A read-only, forward-only binary file over the blob, streamed."""
        return ContentReader(self, digest)

    def status(self, ref: str) -> IngestStatus:
        req = pb.StatusRequest(ref=ref)
        return _status(
            self._t.unary(SERVICE, "Status", req, pb.StatusResponse, idempotent=True).status
        )

    def list_statuses(self, *filters: str) -> builtins.list[IngestStatus]:
        req = pb.ListStatusesRequest(filters=list(filters))
        res = self._t.unary(SERVICE, "ListStatuses", req, pb.ListStatusesResponse, idempotent=True)
        return [_status(s) for s in res.statuses]

    def abort(self, ref: str) -> None:
        """Drops the unfinished write `ref`."""
        req = pb.AbortRequest(ref=ref)
        self._t.unary(SERVICE, "Abort", req, Empty, idempotent=True, missing_ok_on_retry=True)

    def writer(self, ref: str, *, expected: str = "", total: int = 0) -> ContentWriter:
        """Opens (or reopens, at the offset already written) the ingest `ref`.

        Raises `AlreadyExistsError` when `expected` is already in the namespace's content
        store; containerd then adds it to the lease of the call, if any.
        """
        return ContentWriter(self._t, ref, expected=expected, total=total)

    def write(
        self,
        ref: str,
        source: BinaryIO | bytes,
        *,
        expected: str,
        size: int,
        labels: Mapping[str, str] | None = None,
    ) -> bool:
        """Streams `source` into the content store as the blob `expected` of `size` bytes;
        False when the blob was already there (and `source` was not read), else True.

        Never holds more than one chunk in memory. Resumes an ingest left by an earlier
        attempt with the same `ref` (skipping what it already has). `labels` are set on the
        blob either way. containerd checks size and digest at commit: a mismatch raises
        `FailedPreconditionError` and the ingest is aborted.
        """
        stream: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            with self.writer(ref, expected=expected, total=size) as w:
                if w.offset > size:
                    w.truncate()
                if w.offset:
                    _skip(stream, w.offset)
                while chunk := stream.read(CHUNK):
                    w.write(chunk)
                try:
                    w.commit(size=size, expected=expected, labels=labels)
                except Exception:
                    w.close()
                    self.abort(ref)
                    raise
        except AlreadyExistsError:
            if labels:
                self.update_labels(expected, labels)
            return False
        return True


def _skip(stream: BinaryIO, count: int) -> None:
    if stream.seekable():
        stream.seek(count, io.SEEK_CUR)
        return
    while count:
        got = stream.read(min(count, CHUNK))
        if not got:
            raise InvalidError("source ended before the part already written")
        count -= len(got)


class ContentWriter:
    """One open write stream on an ingest; requests and replies go in lock step.

    Use it as a context manager; leaving the block without `commit` keeps the ingest so a
    later writer with the same ref resumes it.
    """

    def __init__(self, transport: Transport, ref: str, *, expected: str, total: int) -> None:
        if not ref:
            raise InvalidError("a content write needs a ref")
        self.ref = ref
        self._requests: queue.SimpleQueue[pb.WriteContentRequest | None] = queue.SimpleQueue()
        self._replies, self._cancel = transport.bidi(
            SERVICE, "Write", iter(self._requests.get, None), pb.WriteContentResponse
        )
        self._closed = False
        self._in_flight: collections.deque[int] = collections.deque()
        reply = self._send(
            pb.WriteContentRequest(action=pb.STAT, ref=ref, expected=expected, total=total)
        )
        self.offset: int = reply.offset
        self.total: int = reply.total

    def __enter__(self) -> ContentWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _reply(self) -> pb.WriteContentResponse:
        try:
            return next(self._replies)
        except StopIteration:
            raise NotFoundError("write stream ended early", rpc="Content.Write") from None
        except BaseException:
            # The call is over: end the request iterator so gRPC's sending thread exits.
            self._closed = True
            self._requests.put(None)
            raise

    def _send(self, req: pb.WriteContentRequest) -> pb.WriteContentResponse:
        self._drain()
        self._requests.put(req)
        return self._reply()

    def _drain(self, keep: int = 0) -> None:
        """Takes the replies to writes in flight until at most `keep` remain."""
        while len(self._in_flight) > keep:
            expected = self._in_flight.popleft()
            reply = self._reply()
            if reply.offset != expected:
                raise InvalidError(
                    f"containerd is at offset {reply.offset} of {self.ref}, not at {expected}",
                    rpc="Content.Write",
                )

    def write(self, data: bytes) -> None:
        """Appends `data` at the current offset, in messages of at most 1 MiB of which up to
        `WINDOW` are in flight (containerd answers them in order, each with its offset)."""
        for start in range(0, len(data), CHUNK):
            part = data[start : start + CHUNK]
            self._requests.put(
                pb.WriteContentRequest(action=pb.WRITE, ref=self.ref, offset=self.offset, data=part)
            )
            self.offset += len(part)
            self._in_flight.append(self.offset)
            self._drain(WINDOW)

    def truncate(self) -> None:
        """Drops everything written so far (containerd truncates on a write at offset 0)."""
        reply = self._send(pb.WriteContentRequest(action=pb.WRITE, ref=self.ref, offset=0))
        self.offset = reply.offset

    def commit(self, *, size: int, expected: str, labels: Mapping[str, str] | None = None) -> str:
        """Commits the ingest as a blob, checked against `size` and `expected`; its digest."""
        reply = self._send(
            pb.WriteContentRequest(
                action=pb.COMMIT,
                ref=self.ref,
                offset=self.offset,
                total=size,
                expected=expected,
                labels=dict(labels or {}),
            )
        )
        self.close()
        return reply.digest

    def close(self) -> None:
        """Half-closes the stream and drains it; the ingest stays unless committed."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(None)
        try:
            for _ in self._replies:
                pass
        except Exception:
            self._cancel()


class ContentReader(io.RawIOBase):
    """A streamed blob as a read-only, forward-only binary file."""

    def __init__(self, content: ContentService, digest: str) -> None:
        super().__init__()
        self._chunks = content.read(digest)
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._buffer:
            self._buffer = memoryview(next(self._chunks, b""))
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def close(self) -> None:
        self._chunks.close()
        super().close()
