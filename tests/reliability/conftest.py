"""The reliability suite (issue 6): prints its figures at the end of the run."""

from __future__ import annotations

import pytest

from tests.reliability import tally


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if tally.FIGURES:
        terminalreporter.section("reliability figures")
        for line in tally.lines():
            terminalreporter.write_line(line)
