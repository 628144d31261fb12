"""`edgedistill --help` and every subcommand's --help print their usage (argparse %-formats help
texts, so a bare "95%" once made the top-level help crash).

    .venv/bin/python -m pytest -q tests/test_cli_help.py
"""

from __future__ import annotations

import argparse

import pytest

from edgedistill import cli
from edgedistill.cli_args import build_parser


def _commands() -> list[str]:
    parser = build_parser(cli.__doc__)
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


@pytest.mark.unit
@pytest.mark.parametrize("argv", [[], *([name] for name in _commands())])
def test_help_prints_the_usage(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([*argv, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage: edgedistill")
