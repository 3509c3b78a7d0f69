"""``ascend env build|list|show|prune``: the environments built from ``requirements``.

Environments live in the job storage (``{storage}/envs/``, see docs/environments.md);
these commands work with the same settings as calls, so ``ascend env build`` makes the
environment a call with the same requirements will find.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import typer

from ascend import _environments
from ascend._cli._common import (
    emit,
    emit_object,
    guard,
    human_age,
    parse_duration,
    run,
    state,
    with_output,
)
from ascend._errors import AscendError
from ascend._resources import Resources, _requirements

app = typer.Typer(help="Environments built from requirements (docs/environments.md).")

COLUMNS = ("key", "requirements", "python", "platform", "size", "age")


def _row(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest.get("spec") or {}
    created = manifest.get("created")
    return {
        "key": manifest.get("key", ""),
        "requirements": spec.get("requirements", []),
        "python": spec.get("python", ""),
        "platform": spec.get("platform", ""),
        "size": manifest.get("size"),
        "age": human_age(time.time() - float(created)) if created else "",
        # JSON times are ISO 8601 in UTC, as in ``ascend jobs list``.
        "created": dt.datetime.fromtimestamp(float(created), dt.UTC).isoformat()
        if created
        else None,
    }


@app.command("build")
@with_output
def build(
    ctx: typer.Context,
    requirements: list[str] = typer.Argument(
        ..., help="requirements (torch==2.6), or one path to requirements.txt/pyproject/uv.lock"
    ),
    local: bool = typer.Option(
        False, "--local", help="build on this machine (uv) instead of a build Job"
    ),
    base_image: str | None = typer.Option(None, help="the image environments start from"),
    platform: str | None = typer.Option(None, help="linux/amd64 (default) or linux/arm64"),
    gpu: str | None = typer.Option(
        None,
        help="the calls' gpu= (2, H100, A100-80GB:2, H100,A100): torch then resolves against "
        "the CUDA index of those nodes' driver, as the calls' environment does",
    ),
    node_type: str | None = typer.Option(None, help="the calls' node_type="),
) -> None:
    """Build the environment for these requirements (nothing if it exists), streaming the
    build's output; prints its key. The environment is the one calls with the same
    requirements (and --gpu/--node-type) use."""
    st = state(ctx)
    try:
        settings = st.settings()
        resources = Resources.build(gpu=_gpu(gpu), node_type=node_type)
        single = requirements[0] if len(requirements) == 1 else None
        given: Any = single if single is not None and Path(single).is_file() else requirements
        normalised = _requirements(given)
        env = run(
            _environments.build_environment(
                settings,
                normalised,
                base_image=base_image,
                platform=platform,
                local=local or None,
                resources=resources,
                on_line=None if st.json else (lambda line: typer.echo(f"[build] {line}")),
            )
        )
    except AscendError as exc:
        raise guard(exc) from None
    where: dict[str, Any] = (
        {"image": env.image}  # registry mode: the image is the environment
        if env.image
        else {"archive": env.archive, "sha256": env.sha256, "size": env.size}
    )
    emit_object(st, {"key": env.key, **where, "built": env.built})


def _gpu(value: str | None) -> int | str | list[str]:
    """``--gpu`` as ``gpu=`` takes it: a count, a product (``H100:2``), or a list."""
    if value is None:
        return 0
    if value.isdigit():
        return int(value)
    return value.split(",") if "," in value else value


@app.command("list")
@with_output
def list_(ctx: typer.Context) -> None:
    """Every environment in the storage, oldest first (bucket mode: registry-mode images
    are in the registry, tagged with their key)."""
    st = state(ctx)
    try:
        manifests = run(_environments.list_environments(st.settings()))
    except AscendError as exc:
        raise guard(exc) from None
    emit(st, [_row(m) for m in manifests], COLUMNS, "ascend environments")


@app.command("show")
@with_output
def show(ctx: typer.Context, key: str = typer.Argument(..., help="a key or its prefix")) -> None:
    """One environment's manifest: its spec, archive, digest and size."""
    st = state(ctx)
    try:
        manifest = run(_environments.show_environment(st.settings(), key))
    except AscendError as exc:
        raise guard(exc) from None
    emit_object(st, manifest)


@app.command("prune")
@with_output
def prune(
    ctx: typer.Context,
    older_than: str = typer.Option("30d", help="remove environments built before this"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be removed, only"),
) -> None:
    """Delete environments older than the cutoff; a later call needing one rebuilds it."""
    st = state(ctx)
    try:
        removed = run(
            _environments.prune_environments(
                st.settings(), older_than=parse_duration(older_than), dry_run=dry_run
            )
        )
    except AscendError as exc:
        raise guard(exc) from None
    emit(
        st,
        [
            {"key": key, "removed": not dry_run, "action": "would remove" if dry_run else "removed"}
            for key in removed
        ],
        ("key", "action"),
        f"ascend env prune{' (dry run)' if dry_run else ''}",
    )
