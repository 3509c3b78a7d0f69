"""The ``ascend`` command line: jobs, env, doctor, init, gc and admin.

Every command resolves settings as the library does — flags > ``ASCEND_*`` >
``[tool.ascend]`` > the user config file — and runs its I/O on the scheduler's loop.
Exit codes: 0 success, 1 failure (one line saying what and how to fix it), 2 usage.
Every listing takes ``--output json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ascend import _config
from ascend._cli import _admin, _doctor, _env, _gc, _jobs
from ascend._cli._common import State, check_output, emit_object, guard, state, with_output
from ascend._errors import AscendError

app = typer.Typer(
    name="ascend",
    help="Run Python functions on Kubernetes: manage jobs, check a setup, provision users.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(_jobs.app, name="jobs")
app.add_typer(_admin.app, name="admin")
app.add_typer(_env.app, name="env")
app.command()(_doctor.doctor)
app.command()(_gc.gc)


@app.callback()
def _global(
    ctx: typer.Context,
    backend: str | None = typer.Option(None, help="local or kubernetes"),
    namespace: str | None = typer.Option(None, help="Kubernetes namespace"),
    storage: str | None = typer.Option(None, help="fsspec URL of the job folders"),
    project: str | None = typer.Option(None),
    user: str | None = typer.Option(None),
    kubeconfig: str | None = typer.Option(None),
    context: str | None = typer.Option(None),
    output: str = typer.Option("table", "--output", "-o", help="table or json"),
) -> None:
    check_output(output)
    given = {
        "backend": backend,
        "namespace": namespace,
        "storage": storage,
        "project": project,
        "user": user,
        "kubeconfig": kubeconfig,
        "context": context,
    }
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    overrides.setdefault("stream_logs", False)
    overrides.setdefault("progress", False)
    ctx.obj = State(overrides=overrides, output=output)


_INIT_KEYS = ("backend", "namespace", "storage", "storage_secret", "image", "project")


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


@app.command()
@with_output
def init(
    ctx: typer.Context,
    storage_secret: str | None = typer.Option(None, help="Secret with the storage credentials"),
    image: str | None = typer.Option(
        None, help="a runner image (registry/name:tag); default: python:X.Y-slim + bootstrap"
    ),
    storage_options: str | None = typer.Option(None, help="fsspec options as JSON"),
    in_project: bool = typer.Option(
        False, "--project-file", help="write [tool.ascend] in ./pyproject.toml instead"
    ),
    force: bool = typer.Option(False, help="replace an existing config"),
) -> None:
    """Write the user config (~/.config/ascend/config.toml) from the global flags and
    these; asks for the backend and storage when they are not given and stdin is a
    terminal."""
    import sys

    st = state(ctx)
    values: dict[str, Any] = {k: v for k, v in st.overrides.items() if k in _INIT_KEYS}
    if storage_secret:
        values["storage_secret"] = storage_secret
    if image:
        values["image"] = image
    if storage_options:
        try:
            values["storage_options"] = json.loads(storage_options)
        except ValueError as exc:
            raise typer.BadParameter(f"--storage-options is not JSON: {exc}") from None
    if not values and not sys.stdin.isatty():
        raise typer.BadParameter(
            "nothing to write: no setting was given and stdin is not a terminal to ask for "
            "them. Fix: pass them as flags, e.g. ascend --backend local --storage "
            "file:///data/ascend init (also --namespace, --project, --user, "
            "--storage-secret, --image, --storage-options)."
        )
    if sys.stdin.isatty():
        values.setdefault("backend", typer.prompt("backend", default="kubernetes"))
        values.setdefault("storage", typer.prompt("storage URL (e.g. s3://bucket/ascend)"))
        if values["backend"] == "kubernetes":
            values.setdefault("namespace", typer.prompt("namespace", default="default"))
    try:
        _config.Settings(**values)  # validated before anything is written
    except AscendError as exc:
        raise guard(exc) from None
    except TypeError as exc:
        raise guard(AscendError(f"invalid setting: {exc}")) from None
    body = "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
    if in_project:
        target = Path.cwd() / "pyproject.toml"
        existing = target.read_text() if target.exists() else ""
        if "[tool.ascend]" in existing and not force:
            raise guard(
                AscendError(f"{target} already has [tool.ascend]. Fix: edit it, or pass --force.")
            )
        if "[tool.ascend]" in existing:
            raise guard(AscendError(f"{target}: edit the existing [tool.ascend] table by hand."))
        target.write_text(
            existing.rstrip("\n") + ("\n\n" if existing else "") + "[tool.ascend]\n" + body
        )
    else:
        target = _config.user_config_path()
        if target.exists() and not force:
            raise guard(AscendError(f"{target} exists. Fix: pass --force to replace it."))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    _config.reset()
    emit_object(st, {"written": str(target), "settings": values})


def main() -> None:
    """The console script's entry point."""
    import sys

    try:
        app()
    except ModuleNotFoundError as exc:
        if exc.name not in ("kubernetes_asyncio", "aiohttp"):
            raise
        sys.stderr.write(
            f"error: this command needs the Kubernetes client ({exc.name} is missing). "
            "Fix: pip install 'ascend-k8s[kubernetes]'.\n"
        )
        sys.exit(1)


__all__ = ["app", "main"]
