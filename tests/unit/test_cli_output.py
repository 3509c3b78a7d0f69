"""Every ``ascend`` command takes ``--output``/``-o`` after its name as well as before."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer

from ascend._cli import app


def _leaves(command: Any, path: str = "ascend") -> Iterator[tuple[str, Any]]:
    children = getattr(command, "commands", None)
    if children is None:
        yield path, command
        return
    for name, child in children.items():
        yield from _leaves(child, f"{path} {name}")


COMMANDS = dict(_leaves(typer.main.get_command(app)))


def test_the_command_tree_is_walked() -> None:
    assert {"ascend jobs list", "ascend env list", "ascend gc", "ascend admin user add"} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_takes_output_and_o_after_its_name(path: str) -> None:
    opts = {opt for param in COMMANDS[path].params for opt in param.opts}
    assert {"--output", "-o"} <= opts, path


@pytest.mark.parametrize("width", [80, 120])
def test_short_columns_keep_their_values_at_narrow_widths(
    width: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rich.console import Console

    from ascend._cli import _common

    monkeypatch.setattr(_common, "console", Console(width=width, force_terminal=False))
    rows = [
        {
            "kind": "folder",
            "name": "file:///home/someone/.cache/ascend/projects/default/users/someone/jobs/"
            "a-long-function-name-0123456789",
            "bytes": 123456,
            "reason": "created 2026-11-30T12:00:00.000000+00:00",
            "state": "succeeded",
        }
    ]
    _common.emit(_common.State(), rows, ("kind", "name", "bytes", "state", "reason"), "t")
    out = capsys.readouterr().out
    for value in ("folder", "123456", "succeeded"):
        assert value in out, out
