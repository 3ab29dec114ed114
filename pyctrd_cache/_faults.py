"""Crash points for the crash-safety tests.

`crash_point(name)` kills the process with SIGKILL the N-th time it is reached when the
environment variable PYCTRD_CRASH_POINT is `name:N` (or just `name`, for N = 1); otherwise
it does nothing. The tests run a child process with the variable set to prove that a crash
at each step of a multi-step change leaves state that `Manager.open` reconciles.
"""

from __future__ import annotations

import itertools
import os
import signal
from typing import Final

_NAME, _, _COUNT = os.environ.get("PYCTRD_CRASH_POINT", "").partition(":")
_AT: Final = int(_COUNT or 1)
_hits = itertools.count(1)


def crash_point(name: str) -> None:
    if _NAME and name == _NAME and next(_hits) == _AT:
        os.kill(os.getpid(), signal.SIGKILL)
