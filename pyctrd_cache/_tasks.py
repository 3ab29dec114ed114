"""The one way the package runs work concurrently: a bounded task group of threads.

Rules:
- Every fan-out runs in a `TaskGroup` (or `run_all`, or `produced` for a producer thread).
  A group's tasks run in threads of the group's own, at most `limit` at a time: groups nest
  (a chain's extraction runs inside a remote's computation) and never wait on each other's
  threads, so nesting cannot deadlock.
- The first error cancels the tasks not yet started (queued for one of the `limit` threads,
  or started after it); tasks already running finish, or stop at their next `checkpoint`
  (a `Cancelled` they raise is no error of the group's). Leaving
  the group waits for every task, then raises every error as one `ExceptionGroup` (the
  block's own error first, then the tasks' in the order they were started). A
  `BaseException` of the block that is not an `Exception` (`GeneratorExit`,
  `KeyboardInterrupt`) is raised as it is, after the wait.
- An `ExceptionGroup` never leaves the package: a function that opens a group, or code that
  catches specific errors of its tasks, unwraps it with `first_error` (or `except*`). The
  caller of a public call so meets the project's `CacheError` subclasses, the first error in
  the order above, with the others named in its notes.
- `detached` is for the one kind of work no one may wait for: a read that can block forever
  (a provider making no progress), abandoned by its reader.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")


class Cancelled(Exception):
    """The task was not started: another task of its group failed first."""


class Task(Generic[T]):
    """One function in a group; `result` waits for it."""

    def __init__(self, index: int, fn: Callable[[], T]) -> None:
        self.index = index
        self.fn = fn
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as err:
            self.error = err
        finally:
            self.done.set()

    def result(self) -> T:
        """The task's value, or its error raised here (`Cancelled` if it never started)."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return cast(T, self.value)


class TaskGroup:
    """Runs the functions given to `start` concurrently, at most `limit` at a time (None:
    each in a thread of its own); see the module's rules."""

    def __init__(self, limit: int | None = None, name: str = "pyctrd-cache") -> None:
        self._limit = limit
        self._name = name
        self._mu = threading.Lock()
        self._tasks: list[Task[object]] = []
        self._pending: queue.SimpleQueue[Task[object]] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._running = 0
        self._failed = False

    def __enter__(self) -> TaskGroup:
        return self

    def start(self, fn: Callable[[], T]) -> Task[T]:
        """Starts `fn` in a thread of its own, or queues it while `limit` tasks run; after a
        failure of the group, cancels it."""
        with self._mu:
            task: Task[T] = Task(len(self._tasks), fn)
            self._tasks.append(cast(Task[object], task))
            if self._failed:
                task.error = Cancelled()
                task.done.set()
            elif self._limit is None or self._running < self._limit:
                self._running += 1
                worker = threading.Thread(
                    target=self._work, args=(task,), name=self._name, daemon=True
                )
                self._workers.append(worker)
                worker.start()
            else:
                self._pending.put(cast(Task[object], task))
        return task

    def _work(self, task: Task[Any] | None) -> None:
        while task is not None:
            task.run()
            task = self._next(task)

    def _next(self, done: Task[Any]) -> Task[Any] | None:
        """The next queued task for a worker that finished `done`; queued tasks after a
        failure are cancelled instead. None: the worker ends."""
        with self._mu:
            if done.error is not None:
                self._failed = True
            while True:
                try:
                    task = self._pending.get_nowait()
                except queue.Empty:
                    self._running -= 1
                    return None
                if not self._failed:
                    return task
                task.error = Cancelled()
                task.done.set()

    def cancel(self) -> None:
        """Tasks not yet started will not start."""
        with self._mu:
            self._failed = True

    def checkpoint(self) -> None:
        """Raises `Cancelled` once the group has failed or was cancelled: a long task calls
        it between its steps to stop early."""
        with self._mu:
            if self._failed:
                raise Cancelled("stopped: another task of its group failed")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.cancel()
        for worker in list(self._workers):
            worker.join()
        if exc is not None and not isinstance(exc, Exception):
            return
        # A block that met a cancelled task raises the error that cancelled it instead.
        errors: list[BaseException] = [] if exc is None or isinstance(exc, Cancelled) else [exc]
        for task in self._tasks:
            err = task.error
            if err is not None and not isinstance(err, Cancelled) and err is not exc:
                errors.append(err)
        if errors:
            if all(isinstance(e, Exception) for e in errors):
                raise ExceptionGroup("concurrent tasks failed", cast(list[Exception], errors))
            raise BaseExceptionGroup("concurrent tasks failed", errors)


def run_all(fns: Sequence[Callable[[], T]], *, limit: int | None = None) -> list[T]:
    """The results of `fns`, run in one group, in order; a single function runs here."""
    if len(fns) == 1:
        return [fns[0]()]
    with TaskGroup(limit) as group:
        tasks = [group.start(fn) for fn in fns]
    return [task.result() for task in tasks]


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The group's first error (the first of a nested group's, depth first), with the
    others named in its notes."""
    leaves: list[BaseException] = []

    def walk(err: BaseException) -> None:
        if isinstance(err, BaseExceptionGroup):
            for inner in err.exceptions:
                walk(inner)
        elif err not in leaves:
            leaves.append(err)

    walk(group)
    first = leaves[0]
    for other in leaves[1:]:
        first.add_note(f"also failed concurrently: {type(other).__name__}: {other}")
    return first


@contextlib.contextmanager
def unwrapped() -> Iterator[None]:
    """Raises the `first_error` of an `ExceptionGroup` raised in the block instead."""
    try:
        yield
    except BaseExceptionGroup as group:
        first = first_error(group)
        # Raised as it was raised in its task: its own cause and context, not the group.
        context = first.__context__
        try:
            raise first
        finally:
            first.__context__ = context


class _Stopped(Exception):
    """The consumer of `produced` went away."""


def produced(run: Callable[[Callable[[T], None]], None], depth: int = 4) -> Generator[T]:
    """The items `run` passes to the function it is given, produced by a task of its own at
    most `depth` ahead; an error of `run` is raised here once the items before it are
    taken. Closing the result stops `run` at its next item."""
    q: queue.Queue[tuple[bool, object]] = queue.Queue(depth)
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> None:
        while True:
            if stop.is_set():
                raise _Stopped
            try:
                q.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            try:
                run(lambda item: put((True, item)))
            finally:
                put((False, None))
        except _Stopped:
            return

    with unwrapped(), TaskGroup(1) as group:
        group.start(produce)
        try:
            while True:
                more, item = q.get()
                if not more:
                    return
                yield cast(T, item)
        finally:
            stop.set()


def pipelined(items: Iterator[T], depth: int = 4) -> Generator[T]:
    """The items of `items`, produced by a task of its own at most `depth` ahead; an error
    of the producer is raised here. Closing the result stops the producer."""

    def run(put: Callable[[T], None]) -> None:
        for item in items:
            put(item)

    return produced(run, depth)


def detached(fn: Callable[[], None], name: str = "pyctrd-cache") -> None:
    """Runs `fn` in a thread no one waits for (see the module's rules); `fn` reports its own
    errors."""
    threading.Thread(target=fn, name=name, daemon=True).start()
