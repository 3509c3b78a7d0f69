"""Running the ``ascend`` command line in tests, through its JSON output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from typer.testing import CliRunner

from ascend._cli import app


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


def ascend_cli(*args: str, output_json: bool = True) -> Outcome:
    """``ascend [-o json] ARGS`` in this process; flags go over the current settings."""
    runner = CliRunner()
    argv = (["--output", "json"] if output_json else []) + list(args)
    result = runner.invoke(app, argv, catch_exceptions=False)
    return Outcome(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def cli() -> Any:
    return ascend_cli
