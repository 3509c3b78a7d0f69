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
