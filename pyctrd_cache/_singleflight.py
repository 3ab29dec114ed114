"""Concurrent callers of the same key share one computation (BuildKit's flightcontrol)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar, cast

T = TypeVar("T")


class SingleFlight:
    """One per manager; never global. With `across`, the leader runs each call inside
    `across(key)` (a lock on the key across processes), so that the calls of several
    processes for one key run one after the other."""

    def __init__(
        self, across: Callable[[str], contextlib.AbstractContextManager[None]] | None = None
    ) -> None:
        self._mu = threading.Lock()
        self._calls: dict[str, Future[Any]] = {}
        self._across = across

    def do(self, key: str, fn: Callable[[], T]) -> T:
        """Runs `fn` unless a call for `key` is under way, in which case its result is shared."""
        with self._mu:
            future = self._calls.get(key)
            leader = future is None
            if future is None:
                future = self._calls[key] = Future()
        if leader:
            try:
                if self._across is None:
                    future.set_result(fn())
                else:
                    with self._across(key):
                        future.set_result(fn())
            except BaseException as err:
                future.set_exception(err)
            finally:
                with self._mu:
                    del self._calls[key]
        return cast(T, future.result())
