"""Crash points for the crash-safety tests.

`crash_point(name)` kills the process with SIGKILL when the environment variable
PYCTRD_CRASH_POINT names that point; otherwise it does nothing. The tests run a child
process with the variable set to prove that a crash at each step of a multi-step change
leaves state `Manager.open` can reconcile.
"""

from __future__ import annotations

import os
import signal
from typing import Final

_ARMED: Final = os.environ.get("PYCTRD_CRASH_POINT", "")


def crash_point(name: str) -> None:
    if _ARMED and name == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
