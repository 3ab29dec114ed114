"""A manager in a process of its own, driven over a pipe: the other process of the
multi-process tests (tests/integration/test_multiprocess.py).

The child (started with the `spawn` method, so it shares nothing with the test process)
opens a manager on the state directory it is given and runs the snippets it receives, one
at a time, in one namespace that keeps `cm` (the manager) and `refs` (a dict of handles
the snippets keep) between them; a snippet's answer is what it left in `result`. Every
answer is sent back as it ends, so the pipe sequences the two processes: no sleeps.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import pathlib
import traceback
from typing import Any

_START_TIMEOUT = 60.0
_CALL_TIMEOUT = 120.0


class PeerError(Exception):
    """A snippet raised in the peer: `kind` is the exception's class name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _serve(
    conn: multiprocessing.connection.Connection,
    address: str,
    namespace: str,
    state_dir: str,
    snapshotter: str,
) -> None:
    # Imported here: the test process imports this module without opening anything.
    import pyctrd_cache
    from pyctrd_cache import CachePolicy, Compression, Manager, PrunePolicy
    from pyctrd_cache.remote import DescHandler
    from tests import layers

    cm = Manager.open(address, namespace=namespace, snapshotter=snapshotter, state_dir=state_dir)
    scope: dict[str, Any] = {
        "cm": cm,
        "refs": {},
        "pyctrd_cache": pyctrd_cache,
        "CachePolicy": CachePolicy,
        "Compression": Compression,
        "PrunePolicy": PrunePolicy,
        "DescHandler": DescHandler,
        "layers": layers,
    }
    conn.send(("ok", cm._core.session))
    while True:
        snippet = conn.recv()
        if snippet is None:
            break
        scope["result"] = None
        try:
            exec(snippet, scope)
        except Exception as err:
            conn.send(("err", type(err).__name__, f"{err}\n{traceback.format_exc()}"))
        else:
            conn.send(("ok", scope["result"]))
    cm.close()
    conn.send(("ok", None))


class Peer:
    """A manager in another process; `run` a snippet there, `kill` it with SIGKILL."""

    def __init__(self, address: str, namespace: str, state_dir: pathlib.Path) -> None:
        from tests.fix_containerd import SNAPSHOTTER

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve,
            args=(child, address, namespace, str(state_dir), SNAPSHOTTER),
            daemon=True,
        )
        self.process.start()
        child.close()
        self.session: str = self._answer(_START_TIMEOUT)

    def send(self, snippet: str | None) -> None:
        """Starts a snippet without waiting for it (`answer` waits)."""
        self._conn.send(snippet)

    def answer(self) -> Any:
        """The answer of the snippet sent last; `PeerError` when it raised."""
        return self._answer(_CALL_TIMEOUT)

    def run(self, snippet: str) -> Any:
        self.send(snippet)
        return self.answer()

    def _answer(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"the peer {self.process.pid} did not answer in {timeout:g}s")
        reply = self._conn.recv()
        if reply[0] == "err":
            raise PeerError(reply[1], reply[2])
        return reply[1]

    def close(self) -> None:
        """Closes the peer's manager and waits for the process to end."""
        if self.process.is_alive():
            self.send(None)
            self._answer(_CALL_TIMEOUT)
            self.process.join(timeout=_CALL_TIMEOUT)
        self._conn.close()

    def kill(self) -> None:
        """SIGKILL: the process ends without closing anything."""
        self.process.kill()
        self.process.join(timeout=_CALL_TIMEOUT)
        self._conn.close()
