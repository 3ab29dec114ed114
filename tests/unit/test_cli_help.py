"""`--help` describes every option and argument of every command."""

from __future__ import annotations

import argparse

from pyctrd_cache.cli import _parser


def _undescribed(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _undescribed(sub, f"{path} {name}")
        elif not action.help:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_and_argument_has_help() -> None:
    assert _undescribed(_parser(), "pyctrd-cache") == []
