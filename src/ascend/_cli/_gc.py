"""``ascend gc``: finished Jobs the TTL missed, old job folders, unreferenced blobs,
stale multipart uploads and expired sessions.

The plan is computed once and either printed (``--dry-run``) or carried out: what a dry
run lists is exactly what the same gc would remove.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import anyio
import typer

from ascend import _config
from ascend._cli._common import (
    emit,
    guard,
    now,
    parse_duration,
    parse_time,
    run,
    state,
    with_output,
)
from ascend._cli._jobs import cluster_jobs, job_state, stored_jobs
from ascend._errors import AscendError
from ascend._storage import JobPaths, Storage

COLUMNS = ("kind", "name", "bytes", "reason")


async def _sizes(storage: Storage, url: str) -> dict[str, dict[str, Any]]:
    """Every file under ``url`` with its size and modification time (fsspec details)."""
    fs = await storage._filesystem()
    try:
        found = await fs._find(storage._path(fs, url), detail=True)
    except FileNotFoundError:
        return {}
    return dict(found)


def _mtime(info: dict[str, Any]) -> dt.datetime | None:
    for key in ("LastModified", "mtime", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        if isinstance(value, int | float):
            return dt.datetime.fromtimestamp(value, dt.UTC)
        if isinstance(value, str):
            parsed = parse_time(value)
            if parsed:
                return parsed
    return None


async def plan(
    settings: _config.Settings, storage: Storage, older_than: float, sessions: bool
) -> list[dict[str, Any]]:
    """What gc removes: one row per Job, job folder, blob, upload or session."""
    cutoff = now() - dt.timedelta(seconds=older_than)
    rows: list[dict[str, Any]] = []
    jobs: dict[str, dict[str, Any]] = {}
    if settings.backend == "kubernetes":
        jobs = await cluster_jobs(settings)
        for job_id, job in jobs.items():
            state_ = job_state(job)
            if state_ in ("succeeded", "failed"):
                finished = parse_time(job.get("status", {}).get("completionTime")) or max(
                    (
                        parse_time(c.get("lastTransitionTime")) or now()
                        for c in job.get("status", {}).get("conditions") or []
                    ),
                    default=now(),
                )
                ttl = job.get("spec", {}).get("ttlSecondsAfterFinished")
                missed = ttl is not None and finished + dt.timedelta(seconds=ttl) < now()
                if finished < cutoff or missed:
                    rows.append(
                        {"kind": "job", "name": job_id, "bytes": 0, "reason": f"{state_} Job"}
                    )
    metas = await stored_jobs(storage, settings)
    if settings.backend == "local":
        from ascend._cli._jobs import local_jobs

        # Liveness alone decides here (a job that still runs is kept), not outcomes.
        jobs = await local_jobs(settings, metas, {})
    keep_blobs: set[str] = set()
    for job_id, meta in metas.items():
        created = parse_time(meta.get("created"))
        found = jobs.get(job_id)
        running = found is not None and job_state(found) in ("pending", "running")
        if running or (created is not None and created >= cutoff):
            keep_blobs.update(meta.get("blobs") or [])
            continue
        paths = JobPaths.of(settings.user_prefix, job_id)
        # A folder without a readable meta.json may be being written. A job past the
        # cutoff whose runners (and client) are gone is garbage, result or not, as a
        # Kubernetes job's folder is once its Job has ended or gone.
        if created is None:
            keep_blobs.update(meta.get("blobs") or [])
            continue
        root = paths.root
        files = await _sizes(storage, root)
        rows.append(
            {
                "kind": "folder",
                "name": root,
                "bytes": sum(int(i.get("size") or 0) for i in files.values()),
                "reason": f"created {meta.get('created') or 'unknown'}",
            }
        )
    for path, info in (await _sizes(storage, f"{settings.blobs}/sha256")).items():
        digest = path.rstrip("/").rsplit("/", 1)[-1]
        mtime = _mtime(info)
        if digest in keep_blobs or mtime is None or mtime >= cutoff:
            continue  # referenced, or too new: a job being submitted may not have meta yet
        rows.append(
            {
                "kind": "blob",
                "name": f"{settings.blobs}/sha256/{digest}",
                "bytes": int(info.get("size") or 0),
                "reason": "no job younger than the cutoff refers to it",
            }
        )
    rows.extend(await _stale_uploads(storage, settings, cutoff))
    if sessions and settings.backend == "kubernetes":
        from ascend.backends._kubernetes._client import Api
        from ascend.backends._kubernetes._session import reap_expired

        api = await Api.connect(settings)
        try:
            expired = await reap_expired(api, settings.namespace or "default", dry_run=True)
            rows.extend(
                {"kind": "session", "name": name, "bytes": 0, "reason": "expired"}
                for name in expired
            )
        finally:
            await api.close()
    return rows


async def _stale_uploads(
    storage: Storage, settings: _config.Settings, cutoff: dt.datetime
) -> list[dict[str, Any]]:
    """S3 multipart uploads under the user's prefix started before the cutoff."""
    fs = await storage._filesystem()
    if not hasattr(fs, "_call_s3"):
        return []
    bucket, _, prefix = storage._path(fs, settings.user_prefix).partition("/")
    answer = await fs._call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    rows = []
    for upload in answer.get("Uploads") or []:
        started = upload.get("Initiated")
        if isinstance(started, dt.datetime) and started < cutoff:
            rows.append(
                {
                    "kind": "upload",
                    "name": f"s3://{bucket}/{upload['Key']}#{upload['UploadId']}",
                    "bytes": 0,
                    "reason": f"multipart upload started {started.isoformat()}",
                }
            )
    return rows


async def carry_out(
    settings: _config.Settings, storage: Storage, rows: list[dict[str, Any]]
) -> None:
    from ascend._cli._jobs import delete_jobs

    job_ids = [r["name"] for r in rows if r["kind"] == "job"]
    if job_ids:
        await delete_jobs(settings, job_ids)

    async def one(row: dict[str, Any]) -> None:
        kind, name = row["kind"], row["name"]
        if kind == "folder":
            await storage.delete(name, recursive=True)
        elif kind == "blob":
            await storage.delete(name)
        elif kind == "upload":
            fs = await storage._filesystem()
            url, _, upload_id = name.partition("#")
            bucket, _, key = url.removeprefix("s3://").partition("/")
            await fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

    async with anyio.create_task_group() as tg:
        for row in rows:
            if row["kind"] not in ("session", "job"):
                tg.start_soon(one, row)
    if any(r["kind"] == "session" for r in rows):
        from ascend.backends._kubernetes._client import Api
        from ascend.backends._kubernetes._session import reap_expired

        api = await Api.connect(settings)
        try:
            await reap_expired(api, settings.namespace or "default")
        finally:
            await api.close()


@with_output
def gc(
    ctx: typer.Context,
    older_than: str = typer.Option("7d", help="remove what is older than this (90m, 2h, 7d)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be removed, only"),
    sessions: bool = typer.Option(False, "--sessions", help="also delete expired sessions"),
) -> None:
    """Remove finished Jobs, old job folders (never a running job's), blobs no recent job
    refers to, stale multipart uploads and, with --sessions, expired client sessions (and
    so their Jobs)."""
    st = state(ctx)
    seconds = parse_duration(older_than)
    try:
        settings = st.settings()
        from ascend._scheduler import get_scheduler

        storage = get_scheduler().storage(settings)
        rows = run(plan(settings, storage, seconds, sessions))
        if not dry_run:
            run(carry_out(settings, storage, rows))
    except AscendError as exc:
        raise guard(exc) from None
    for row in rows:
        row["removed"] = not dry_run
    emit(st, rows, COLUMNS, f"ascend gc{' (dry run)' if dry_run else ''}")
    if not st.json:
        total = sum(r["bytes"] for r in rows)
        verb = "would free" if dry_run else "freed"
        typer.echo(f"{len(rows)} item(s); {verb} {total} bytes")
