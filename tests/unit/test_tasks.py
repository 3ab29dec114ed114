"""The one way the package runs work concurrently (`pyctrd_cache._tasks`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from pyctrd_cache._tasks import (
    Cancelled,
    TaskGroup,
    first_error,
    pipelined,
    produced,
    run_all,
    unwrapped,
)
from pyctrd_cache.errors import CacheError, NotFoundError


def test_results_come_in_the_order_of_the_functions() -> None:
    def later(i: int) -> Callable[[], int]:
        def fn() -> int:
            time.sleep(0.01 * (5 - i))
            return i

        return fn

    assert run_all([later(i) for i in range(5)]) == [0, 1, 2, 3, 4]
    assert run_all([]) == []


def test_at_most_limit_tasks_run_at_a_time() -> None:
    running, peak = 0, 0
    mu = threading.Lock()

    def task() -> None:
        nonlocal running, peak
        with mu:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with mu:
            running -= 1

    run_all([task] * 12, limit=3)
    assert peak == 3


def test_every_error_is_raised_as_a_group() -> None:
    # Both start before either fails: a failure cancels only the tasks not yet started.
    both = threading.Barrier(2)

    def fail(err: Exception) -> Callable[[], None]:
        def fn() -> None:
            both.wait()
            raise err

        return fn

    a, b = NotFoundError("a"), CacheError("b")
    with pytest.raises(ExceptionGroup) as caught:
        run_all([fail(a), fail(b)])
    assert list(caught.value.exceptions) == [a, b]


def test_a_failure_cancels_the_tasks_not_yet_started() -> None:
    started: list[int] = []

    def task(i: int) -> Callable[[], None]:
        def fn() -> None:
            started.append(i)
            if i == 0:
                raise CacheError("first")

        return fn

    group = TaskGroup(limit=1)
    with pytest.raises(ExceptionGroup) as caught, group:
        tasks = [group.start(task(i)) for i in range(4)]
    assert started == [0]
    assert [type(e) for e in caught.value.exceptions] == [CacheError]
    with pytest.raises(Cancelled):
        tasks[1].result()


def _raise(err: BaseException) -> None:
    raise err


def _wait_for_a_cancelled_task(err: Exception) -> None:
    with TaskGroup(limit=1) as group:
        failing = group.start(lambda: _raise(err))
        never = group.start(lambda: None)
        failing.done.wait()
        never.result()  # cancelled: the block meets Cancelled, the group raises `err`


def _fail_in_the_block(err: Exception, own: Exception) -> None:
    with TaskGroup() as group:
        group.start(lambda: _raise(err)).done.wait()
        raise own


def test_the_blocks_error_comes_first_and_a_cancelled_wait_is_not_one() -> None:
    err = CacheError("task")
    with pytest.raises(ExceptionGroup) as caught:
        _wait_for_a_cancelled_task(err)
    assert list(caught.value.exceptions) == [err]

    own = ValueError("block")
    with pytest.raises(ExceptionGroup) as caught:
        _fail_in_the_block(err, own)
    assert list(caught.value.exceptions) == [own, err]


def test_a_public_call_meets_the_first_error_with_the_others_noted() -> None:
    both = threading.Barrier(2)

    def fail(message: str) -> Callable[[], None]:
        def fn() -> None:
            both.wait()
            raise NotFoundError(message)

        return fn

    with pytest.raises(NotFoundError) as caught, unwrapped():
        run_all([fail("one"), fail("two")])
    assert str(caught.value) == "one"
    assert caught.value.__notes__ == ["also failed concurrently: NotFoundError: two"]
    cause = OSError("provider")

    def fail_with_cause() -> None:
        both.wait()
        raise CacheError("provider failed") from cause

    with pytest.raises(CacheError) as caused, unwrapped():
        run_all([fail_with_cause, fail("three")])
    assert caused.value.__cause__ is cause
    assert caused.value.__context__ is None  # not the group
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [KeyError(1)]), KeyError(2)])
    assert first_error(nested).args == (1,)


def test_groups_nest_without_waiting_on_each_others_threads() -> None:
    def inner() -> int:
        return sum(run_all([lambda: 1, lambda: 2], limit=1))

    assert run_all([inner, inner], limit=1) == [3, 3]


def test_produced_items_then_the_producers_error() -> None:
    def run(put: Callable[[int], None]) -> None:
        for i in range(10):
            put(i)
        raise CacheError("producer failed")

    seen: list[int] = []

    def consume() -> None:
        for item in produced(run, depth=2):
            seen.append(item)

    with pytest.raises(CacheError, match="producer failed"):
        consume()
    assert seen == list(range(10))
    assert list(pipelined(iter(range(5)))) == [0, 1, 2, 3, 4]


def test_closing_produced_stops_the_producer() -> None:
    stopped = threading.Event()

    def run(put: Callable[[int], None]) -> None:
        try:
            i = 0
            while True:
                put(i)
                i += 1
        finally:
            stopped.set()

    items = produced(run, depth=1)
    assert next(items) == 0
    items.close()
    assert stopped.is_set()


def test_a_running_task_stops_at_its_checkpoint_once_the_group_failed() -> None:
    steps: list[int] = []
    running = threading.Event()
    group = TaskGroup()

    def long() -> None:
        running.set()
        for i in range(1000):
            group.checkpoint()
            steps.append(i)
            time.sleep(0.001)

    def fail() -> None:
        running.wait()
        raise CacheError("first")

    with pytest.raises(ExceptionGroup) as caught, group:
        tasks = [group.start(long), group.start(fail)]
    assert [type(e) for e in caught.value.exceptions] == [CacheError]  # not its Cancelled
    assert len(steps) < 1000
    with pytest.raises(Cancelled):
        tasks[0].result()
