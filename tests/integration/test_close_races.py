"""Work racing with close gets the project's error, and sizes measured while a record moves
are not cached wrong (issue 15)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pyctrd_cache import CacheError, InvalidError
from pyctrd_cache.client import Client
from tests.fix_containerd import SNAPSHOTTER, Managers
from tests.layers import make_tar


def test_a_finalize_racing_with_close_raises_the_projects_error(managers: Managers) -> None:
    cm = managers.open()
    work = cm.new()
    work.apply(make_tar({"file": b"x"}))
    ref = cm.get(work.commit().id)
    errors: list[BaseException] = []

    def finalize() -> None:
        try:
            ref.finalize()
        except BaseException as err:
            errors.append(err)

    # The finalize passes its checks, then waits for the record lock while the manager
    # closes under it.
    with ref._rec.mu:
        worker = threading.Thread(target=finalize)
        worker.start()
        time.sleep(0.5)
        closer = threading.Thread(target=cm.close)
        closer.start()
        closer.join(timeout=30)
    worker.join(timeout=30)
    assert len(errors) == 1
    assert isinstance(errors[0], CacheError), repr(errors[0])
    for call in (cm.disk_usage, cm.prune, lambda: cm.new().release(), ref.size):
        with pytest.raises(InvalidError, match="closed"):
            call()


def test_a_size_that_found_no_snapshot_is_not_cached(managers: Managers, client: Client) -> None:
    cm = managers.open()
    work = cm.new()
    work.apply(make_tar({"file": os.urandom(64 * 1024)}))
    ref = work.commit()
    ref.finalize()
    # The snapshot goes behind the manager's back (as a finalize moves it away from a
    # measurement): what is measured then is not kept.
    client.snapshots(SNAPSHOTTER).remove(ref.id)
    assert ref.size() == 0
    assert ref.info().size is None
    ref.release()
