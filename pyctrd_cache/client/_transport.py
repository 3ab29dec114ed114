"""The gRPC side of the client: channel, headers, deadlines, retries and error mapping.

This module and the service modules beside it are the only ones that touch grpc or protobuf.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from ..errors import (
    AlreadyExistsError,
    CacheError,
    ContainerdError,
    FailedPreconditionError,
    InvalidError,
    LockedError,
    NoSpaceError,
    NotFoundError,
    UnavailableError,
    UnimplementedError,
)

R = TypeVar("R", bound=Message)

NAMESPACE_HEADER: Final = "containerd-namespace"
LEASE_HEADER: Final = "containerd-lease"
MAX_MESSAGE: Final = 16 << 20
# containerd's own rule for namespace names.
_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
_NAMESPACE_MAX: Final = 76

_CODE_CLASSES: Final[dict[grpc.StatusCode, tuple[type[CacheError], str]]] = {
    grpc.StatusCode.NOT_FOUND: (NotFoundError, "not found"),
    grpc.StatusCode.ALREADY_EXISTS: (AlreadyExistsError, "already exists"),
    grpc.StatusCode.INVALID_ARGUMENT: (InvalidError, "invalid argument"),
    grpc.StatusCode.OUT_OF_RANGE: (InvalidError, "out of range"),
    grpc.StatusCode.FAILED_PRECONDITION: (FailedPreconditionError, "failed precondition"),
    grpc.StatusCode.UNIMPLEMENTED: (UnimplementedError, "not implemented by this containerd"),
    grpc.StatusCode.UNAVAILABLE: (UnavailableError, "containerd is unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (UnavailableError, "containerd did not answer in time"),
}

log = logging.getLogger(__name__)


def map_rpc_error(err: grpc.RpcError, rpc: str) -> CacheError:
    """The project error for a failed call: the one place gRPC statuses are translated."""
    code, details = _status(err)
    if "no space left on device" in details:
        # ENOSPC in containerd's root, whatever status the call chose to carry it.
        return NoSpaceError("containerd's file system is full", rpc=rpc, message=details)
    if code is grpc.StatusCode.UNAVAILABLE and " locked" in details:
        # An ingest ref held by another writer stream.
        return LockedError("locked", rpc=rpc, message=details)
    cls, summary = _CODE_CLASSES.get(code, (ContainerdError, code.name.lower().replace("_", " ")))
    return cls(summary, rpc=rpc, message=details)


def _status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, grpc.Call):
        return err.code(), err.details() or ""
    return grpc.StatusCode.UNKNOWN, str(err)


def _transient(err: grpc.RpcError) -> bool:
    code, details = _status(err)
    return code is grpc.StatusCode.UNAVAILABLE and " locked" not in details


class Transient(Exception):
    """An UNAVAILABLE answer that a repeatable call may retry."""

    def __init__(self, err: grpc.RpcError) -> None:
        super().__init__(str(err))
        self.err = err


def validate_namespace(namespace: str) -> str:
    if len(namespace) > _NAMESPACE_MAX or not _NAMESPACE_RE.match(namespace):
        raise InvalidError(
            f"invalid containerd namespace {namespace!r}: it must be at most {_NAMESPACE_MAX} "
            "letters and digits, separated by single '.', '_' or '-'"
        )
    return namespace


def normalize_address(address: str) -> str:
    """An absolute socket path for `address` (a path or a `unix://` URI)."""
    path = address.removeprefix("unix://")
    if not path:
        raise InvalidError("empty containerd address")
    return os.path.abspath(path)


def to_datetime(ts: Timestamp) -> datetime | None:
    # containerd 1.6 sends the zero time (year 1) for unset timestamps.
    if ts.seconds <= 0:
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)


def _log_retry(state: RetryCallState) -> None:
    log.debug(
        "containerd unavailable; retrying (attempt %d, %.1fs so far)",
        state.attempt_number,
        state.seconds_since_start or 0.0,
    )


class Transport:
    """A channel to one daemon plus the headers, deadlines and retry budget of a client.

    Copies made with `with_lease` share the channel; closing any of them closes it.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        namespace: str,
        timeout: float,
        long_timeout: float,
        retry_budget: float,
        lease: str = "",
        channel: grpc.Channel | None = None,
        closed: threading.Event | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.namespace = validate_namespace(namespace)
        self.timeout = timeout
        self.long_timeout = long_timeout
        self.retry_budget = retry_budget
        self.lease = lease
        self._channel = channel or grpc.insecure_channel(
            "unix://" + socket_path,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self._callables: dict[str, Any] = {}
        self._lock = threading.Lock()
        # Shared by the copies, like the channel.
        self._closed = closed or threading.Event()
        headers = [(NAMESPACE_HEADER, self.namespace)]
        if lease:
            headers.append((LEASE_HEADER, lease))
        self.metadata: tuple[tuple[str, str], ...] = tuple(headers)

    def with_lease(self, lease: str) -> Transport:
        """A transport whose calls attach what they create to `lease`."""
        return Transport(
            self.socket_path,
            namespace=self.namespace,
            timeout=self.timeout,
            long_timeout=self.long_timeout,
            retry_budget=self.retry_budget,
            lease=lease,
            channel=self._channel,
            closed=self._closed,
        )

    def close(self) -> None:
        self._closed.set()
        self._channel.close()

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise InvalidError(f"the client of containerd at {self.socket_path} is closed")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Starts a call; one that meets the channel closed raises the project's error."""
        self._check_open()
        try:
            return fn(*args, **kwargs)
        except ValueError:
            # grpc's "Cannot invoke RPC on closed channel!"
            self._check_open()
            raise

    def _callable(self, kind: str, path: str, response_type: type[Message]) -> Any:
        with self._lock:
            fn = self._callables.get(path)
            if fn is None:
                factory = getattr(self._channel, kind)
                fn = factory(
                    path,
                    request_serializer=_serialize,
                    response_deserializer=response_type.FromString,
                )
                self._callables[path] = fn
            return fn

    def retrying(self) -> Retrying:
        return Retrying(
            retry=retry_if_exception_type(Transient),
            stop=stop_after_delay(self.retry_budget),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            before_sleep=_log_retry,
            reraise=True,
        )

    def unavailable(self, rpc: str, err: grpc.RpcError) -> UnavailableError:
        _, details = _status(err)
        return UnavailableError(
            f"containerd at {self.socket_path} is unavailable (gave up after "
            f"{self.retry_budget:g}s of retries)",
            rpc=rpc,
            message=details,
        )

    def unary(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[R],
        *,
        idempotent: bool,
        missing_ok_on_retry: bool = False,
        long: bool = False,
    ) -> R:
        """Calls a unary RPC of `containerd.services.<service>`.

        `idempotent` calls are repeated on UNAVAILABLE within the retry budget; with
        `missing_ok_on_retry` (deletes) a NOT_FOUND after a retry counts as done and the
        response is empty.
        """
        rpc = f"{service.rsplit('.', 1)[-1]}.{method}"
        fn = self._callable("unary_unary", f"/{service}/{method}", response_type)
        timeout = self.long_timeout if long else self.timeout
        try:
            for attempt in self.retrying():
                with attempt:
                    try:
                        result: R = self._call(fn, request, timeout=timeout, metadata=self.metadata)
                        return result
                    except grpc.RpcError as err:
                        retried = attempt.retry_state.attempt_number > 1
                        code, _ = _status(err)
                        if missing_ok_on_retry and retried and code is grpc.StatusCode.NOT_FOUND:
                            return response_type()
                        if idempotent and _transient(err):
                            raise Transient(err) from err
                        raise map_rpc_error(err, rpc) from None
        except Transient as t:
            raise self.unavailable(rpc, t.err) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def server_stream(
        self, service: str, method: str, request: Message, response_type: type[R], *, long: bool
    ) -> Iterator[R]:
        """Streams replies; errors are mapped, and the caller decides about retries."""
        rpc = f"{service.rsplit('.', 1)[-1]}.{method}"
        fn = self._callable("unary_stream", f"/{service}/{method}", response_type)
        timeout = self.long_timeout if long else self.timeout
        responses = self._call(fn, request, timeout=timeout, metadata=self.metadata)
        try:
            yield from responses
        except grpc.RpcError as err:
            if _transient(err):
                raise Transient(err) from err
            raise map_rpc_error(err, rpc) from None
        finally:
            responses.cancel()

    def collect(
        self, service: str, method: str, request: Message, response_type: type[R]
    ) -> list[R]:
        """All replies of a listing stream, started again on UNAVAILABLE within the budget."""
        rpc = f"{service.rsplit('.', 1)[-1]}.{method}"
        try:
            for attempt in self.retrying():
                with attempt:
                    return list(
                        self.server_stream(service, method, request, response_type, long=False)
                    )
        except Transient as t:
            raise self.unavailable(rpc, t.err) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def bidi(
        self, service: str, method: str, requests: Iterator[Message], response_type: type[R]
    ) -> tuple[Iterator[R], Callable[[], None]]:
        """Opens a bidirectional stream: its replies (errors mapped) and a cancel function."""
        rpc = f"{service.rsplit('.', 1)[-1]}.{method}"
        fn = self._callable("stream_stream", f"/{service}/{method}", response_type)
        call = self._call(fn, requests, timeout=self.long_timeout, metadata=self.metadata)

        def replies() -> Iterator[R]:
            try:
                yield from call
            except grpc.RpcError as err:
                raise map_rpc_error(err, rpc) from None

        return replies(), call.cancel


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


__all__ = [
    "Transient",
    "Transport",
    "map_rpc_error",
    "normalize_address",
    "to_datetime",
    "validate_namespace",
]
