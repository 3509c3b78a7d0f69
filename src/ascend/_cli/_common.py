"""What every command shares: settings from flags, running coroutines on the scheduler's
loop, printing tables or JSON, and turning ascend's errors into exit code 1."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import inspect
import json
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from ascend import _config
from ascend._errors import AscendError, ConfigError

T = TypeVar("T")
P = ParamSpec("P")

OUTPUTS = ("table", "json")

console = Console()
errors = Console(stderr=True)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"7d"``, ``"1w"`` (or plain seconds) in seconds."""
    match = _DURATION.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration. Use e.g. 90s, 15m, 2h, 7d.")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class State:
    """The global options, as given on the command line (None: not given)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    output: str = "table"

    @property
    def json(self) -> bool:
        return self.output == "json"

    def settings(self) -> _config.Settings:
        """Flags > ASCEND_* > [tool.ascend] > user config > defaults; also made current,
        so futures attached by the command use the same settings."""
        return _config.configure(**self.overrides)


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    assert isinstance(obj, State)
    return obj


def check_output(value: str) -> str:
    if value not in OUTPUTS:
        raise typer.BadParameter(f"--output must be table or json, not {value!r}")
    return value


def with_output(command: Callable[P, None]) -> Callable[P, None]:
    """Let a command take ``--output``/``-o`` after its name as well as before it
    (``ascend jobs list -o json`` = ``ascend -o json jobs list``); given after the name,
    it wins. The command must take ``ctx: typer.Context``."""
    signature = inspect.signature(command)
    if "ctx" not in signature.parameters or "output" in signature.parameters:
        raise TypeError(f"{command.__name__}: with_output needs a ctx and no output of its own")

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        output = kwargs.pop("output", None)
        if output is not None:
            state(kwargs["ctx"]).output = check_output(str(output))  # type: ignore[arg-type]
        command(*args, **kwargs)

    option = inspect.Parameter(
        "output",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(None, "--output", "-o", help="table or json (as before the command)"),
        annotation="str | None",
    )
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), option]
    )
    wrapper.__annotations__ = {**command.__annotations__, "output": "str | None"}
    return wrapper


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the scheduler's loop thread (the one every call uses)."""
    from ascend._scheduler import get_scheduler

    loop = get_scheduler()._loop
    assert loop is not None
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def fail(message: str) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


# Columns a reader copies whole into the next command, and columns of prose.
_WHOLE = frozenset({"job_id", "lease", "key"})
_PROSE = frozenset({"detail", "fix", "reason", "resources", "requirements", "function"})


def emit(st: State, rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str) -> None:
    """A listing: a JSON array with ``--output json``, else a table."""
    if st.json:
        sys.stdout.write(json.dumps(list(rows), indent=2, default=str) + "\n")
        return
    # Columns nobody filled are left out; ids and names are never cut (they are what a
    # reader copies into the next command).
    columns = [c for c in columns if any(row.get(c) not in (None, "") for row in rows)] or list(
        columns
    )
    table = Table(title=title)
    for column in columns:
        longest = max((len(_cell(row.get(column))) for row in rows), default=0)
        if column in _WHOLE:
            table.add_column(column, no_wrap=True, overflow="fold")
        elif column == "name":  # a path or a URL: folded over lines, never cut
            table.add_column(column, overflow="fold", min_width=min(longest, 24))
        elif column in _PROSE:  # wraps, but never shrinks to nothing
            table.add_column(column, overflow="fold", min_width=min(longest, 16))
        else:  # short values (states, counts, sizes, ages): never cut
            table.add_column(column, no_wrap=True, min_width=max(len(column), longest))
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def emit_object(st: State, value: dict[str, Any]) -> None:
    if st.json:
        sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
        return
    for key, item in value.items():
        console.print(f"[bold]{key}[/bold]: {_cell(item)}", highlight=False, soft_wrap=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return str(value)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def require_kubernetes(settings: _config.Settings, what: str) -> None:
    if settings.backend != "kubernetes":
        raise ConfigError(
            f"{what} needs the Kubernetes backend, but backend is {settings.backend!r}. Fix: "
            "pass --backend kubernetes or set ASCEND_BACKEND=kubernetes."
        )


def guard(error: BaseException) -> typer.Exit:
    """ascend's own errors become one red line and exit code 1."""
    if isinstance(error, AscendError):
        return fail(str(error))
    raise error
