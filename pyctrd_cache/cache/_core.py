"""The state that a manager's records, handles and blob functions share (BuildKit keeps it
in its cacheManager struct): the client, the metadata store, the snapshotter, the manager
lock and the records it guards, single-flight, leases and ids, and the background remover.

The `Manager` owns one `Core`; records receive it instead of the manager, so what they may
touch is this surface and nothing else of the manager.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Final

from .._singleflight import SingleFlight
from ..client import Client
from ..errors import AlreadyExistsError, InvalidError, NotFoundError
from ..metadata import MetadataStore
from .refs import RecordState

if TYPE_CHECKING:
    from .refs import _Record

OWNER_LABEL: Final = "pyctrd-cache/manager"
"""On every lease a manager creates; the value is the id of the manager's metadata store."""
KIND_LABEL: Final = "pyctrd-cache/kind"
SESSION_LABEL: Final = "pyctrd-cache/session"
"""The id of the `Manager.open` that created the lease (one per opening): its session in the
metadata store, whose leases other than records' go once its process is dead."""

_log = logging.getLogger("pyctrd_cache")


def new_id() -> str:
    """25 lowercase base-36 characters of 128 random bits, as BuildKit's identity.NewID."""
    n = int.from_bytes(os.urandom(16), "big")
    chars = []
    for _ in range(25):
        n, d = divmod(n, 36)
        chars.append("0123456789abcdefghijklmnopqrstuvwxyz"[d])
    return "".join(reversed(chars))


class Core:
    """One per manager. `mu` is the manager lock: it guards `records` and is taken before
    any record lock (refs.py states the record locking rules)."""

    def __init__(self, client: Client, store: MetadataStore, snapshotter: str) -> None:
        self.client = client
        self.store = store
        self.snapshotter = snapshotter
        self.mu = threading.Lock()
        self.records: dict[str, _Record] = {}
        # Calls for one key share one computation in this process, and run one after the
        # other across processes; each call first checks whether its work is done.
        self.flight = SingleFlight(store.exclusive)
        self.session = new_id()
        # Records `new` is writing outside the manager lock: not loaded from their rows.
        self.creating: set[str] = set()
        store.open_session(self.session)
        # The leases of this state that `open` found: the ones it reconciled.
        self.seen_at_open: frozenset[str] = frozenset()
        # The background remover (eight threads: with one, finalize cycles are slower).
        self._remover = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pyctrd-cache")
        self._background: set[Future[None]] = set()
        self._closed = False
        self._working = 0
        self._idle = threading.Condition(self.mu)

    def close(self) -> bool:
        """Marks the core closed and waits for the work under way (`working`) and for
        background removals; False when it was already closed. Closed before the remover
        stops, so that work racing with close meets the project's error, never the
        executor's."""
        with self.mu:
            if self._closed:
                return False
            self._closed = True
            self._idle.wait_for(lambda: not self._working)
        self._remover.shutdown(wait=True)
        return True

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Work of the caller's that `close` waits for; `InvalidError` once closed. The
        manager lock must not be held."""
        with self.mu:
            self.check_open()
            self._working += 1
        try:
            yield
        finally:
            with self.mu:
                self._working -= 1
                self._idle.notify_all()

    def check_open(self) -> None:
        if self._closed:
            raise InvalidError("the cache manager is closed")

    @property
    def mounts_dir(self) -> pathlib.Path:
        """Where handles mount (see `pyctrd_cache.mountpoints`)."""
        return self.store.state_dir / "mounts"

    def new_id(self) -> str:
        return new_id()

    # Leases.

    def lease_labels(self, kind: str) -> dict[str, str]:
        return {OWNER_LABEL: self.store.manager_id, KIND_LABEL: kind, SESSION_LABEL: self.session}

    def create_lease(
        self,
        lease_id: str,
        kind: str,
        *,
        exist_ok: bool = False,
        expire: timedelta | None = None,
    ) -> Client:
        """Creates a flat lease owned by this manager; a client whose calls attach to it."""
        try:
            self.client.leases.create(
                lease_id, labels=self.lease_labels(kind), flat=True, expire=expire
            )
        except AlreadyExistsError:
            if not exist_ok:
                raise
        return self.client.with_lease(lease_id)

    def drop_lease(self, lease_id: str) -> None:
        """Deletes a lease; containerd collects what it held at the next prune at the latest."""
        with contextlib.suppress(NotFoundError):
            self.client.leases.delete(lease_id)

    # The background remover.

    def remove_later(self, rec: _Record) -> None:
        """Removes `rec`, a REMOVING record, outside the caller's locks."""

        def remove() -> None:
            with self.mu, rec.mu:
                if rec.state is RecordState.REMOVING:
                    rec.remove()

        try:
            future = self._remover.submit(remove)
        except RuntimeError:
            # The manager closed meanwhile: the row is marked deleted, `open` finishes it.
            _log.debug("manager closed: the removal of %s is left to the next open", rec.id)
            return
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    def wait_background(self) -> None:
        """Waits for the removals already scheduled (finalized mutables)."""
        for future in list(self._background):
            future.result()
