"""``ascend jobs``: list, status, logs, cancel and result, from the cluster and storage."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import anyio
import typer

from ascend import _config
from ascend._cli._common import (
    emit,
    emit_object,
    fail,
    guard,
    human_age,
    now,
    parse_duration,
    parse_time,
    require_kubernetes,
    run,
    state,
    with_output,
)
from ascend._errors import AscendError, PermissionDenied
from ascend._storage import JobPaths, Storage, checked_job_id
from ascend_runner import protocol

app = typer.Typer(help="List and manage your jobs.", no_args_is_help=True)

STATES = ("pending", "running", "succeeded", "failed", "cancelled", "finished")
COLUMNS = ("job_id", "function", "kind", "state", "done", "failed", "age", "duration", "resources")


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def job_state(job: dict[str, Any]) -> str:
    """The state of a Kubernetes Job as ``jobs list`` shows it."""
    if _condition(job, "Complete") or _condition(job, "SuccessCriteriaMet"):
        status = job.get("status", {})
        return "failed" if status.get("failedIndexes") else "succeeded"
    if _condition(job, "Failed") or _condition(job, "FailureTarget"):
        return "failed"
    if job.get("status", {}).get("active") or job.get("status", {}).get("ready"):
        return "running"
    return "pending"


async def cluster_jobs(
    settings: _config.Settings, *, all_users: bool = False
) -> dict[str, dict[str, Any]]:
    """ascend's Jobs by job id: this user's in the namespace, or (``all_users``) every
    user's in every namespace — an admin view that raises PermissionDenied otherwise."""
    from ascend.backends._kubernetes._client import Api

    api = await Api.connect(settings)
    try:
        selector = "app.kubernetes.io/managed-by=ascend"
        if all_users:
            path = "/apis/batch/v1/jobs"
        else:
            selector += f",ascend.dev/user={settings.user}"
            path = f"/apis/batch/v1/namespaces/{settings.namespace or 'default'}/jobs"
        listing = await api.request("GET", path, query={"labelSelector": selector})
    finally:
        await api.close()
    return {
        j["metadata"].get("labels", {}).get("ascend.dev/job-id", j["metadata"]["name"]): j
        for j in listing.get("items") or []
    }


def _local_unit_states(settings: _config.Settings, job_ids: list[str]) -> dict[str, dict[int, str]]:
    """Each job's units' states from their runner records (blocking: reads files and
    asks the system about processes)."""
    from ascend.backends import _local_records

    return {
        job_id: {
            unit: _local_records.unit_state(record)
            for unit, record in _local_records.read(
                JobPaths.of(settings.user_prefix, job_id).root, job_id
            ).items()
        }
        for job_id in job_ids
    }


def local_job(
    meta: dict[str, Any], units_state: dict[int, str], statuses: dict[int, str]
) -> dict[str, Any] | None:
    """A local job's runner records as the Kubernetes Job status they stand for, so one
    summary decides both backends' states: ``active`` while a runner (or the client
    that starts it) lives; ``failedIndexes``: units whose runner ended without publishing
    every item's result (crashed, killed, timed out); ``None`` without records.
    ``units_state``: ``live``, ``ended`` or ``cancelled`` by unit."""
    if not units_state:
        return None
    units = meta.get("units") or [[0, 1]]
    active = 0
    failed: list[int] = []
    for unit, state_ in sorted(units_state.items()):
        if state_ == "live":
            active += 1
        elif state_ == "ended":
            start, stop = units[unit] if unit < len(units) else (0, 0)
            if any(i not in statuses for i in range(int(start), int(stop))):
                failed.append(unit)
    status: dict[str, Any] = {"failedIndexes": ",".join(map(str, failed))}
    if active:
        status["active"] = active
    else:
        ended = "Failed" if failed else "Complete"
        status["conditions"] = [{"type": ended, "status": "True"}]
    return {"metadata": {"name": meta.get("job_id")}, "spec": {}, "status": status}


async def local_jobs(
    settings: _config.Settings,
    metas: dict[str, dict[str, Any]],
    outcomes: dict[str, dict[int, str]],
) -> dict[str, dict[str, Any]]:
    """The Job-like status of every local job that has runner records, by job id."""
    states = await anyio.to_thread.run_sync(_local_unit_states, settings, list(metas))
    jobs: dict[str, dict[str, Any]] = {}
    for job_id, meta in metas.items():
        job = local_job({**meta, "job_id": job_id}, states[job_id], outcomes.get(job_id, {}))
        if job is not None:
            jobs[job_id] = job
    return jobs


async def stored_jobs(storage: Storage, settings: _config.Settings) -> dict[str, dict[str, Any]]:
    """Every job folder's meta.json under this user's prefix, by job id."""
    ids = await storage.list(f"{settings.user_prefix}/jobs")
    metas: dict[str, dict[str, Any]] = {}

    async def one(job_id: str) -> None:
        try:
            metas[job_id] = await storage.read_json(JobPaths.of(settings.user_prefix, job_id).meta)
        except (FileNotFoundError, AscendError, ValueError):
            metas[job_id] = {"job_id": job_id}  # a folder without (readable) meta.json

    async with anyio.create_task_group() as tg:
        for job_id in ids:
            tg.start_soon(one, job_id)
    return metas


async def _published(storage: Storage, url: str) -> str | None:
    """``ok``/``error``/``unknown`` for a published result, ``None`` when there is none.

    Only the result's first bytes are read (a listing must not download every model a
    job returned), and its signature is not checked: a listing shows, it hands no value
    to anyone (and so works with another machine's signing key)."""
    from ascend import _serialization

    try:
        head = await storage.read_head(url, _serialization.STATUS_HEAD)
    except FileNotFoundError:
        return None
    return _serialization.peek_status(head) or "unknown"


async def stored_outcome(
    storage: Storage, settings: _config.Settings, meta: dict[str, Any]
) -> dict[int, str]:
    """The published results of a job, from storage: ``{item: "ok" | "error" |
    "unknown"}`` (a call is item 0); an item without a result is left out."""
    paths = JobPaths.of(settings.user_prefix, str(meta["job_id"]))
    if meta.get("kind") != "map":
        status = await _published(storage, paths.result)
        return {} if status is None else {0: status}
    items = [
        int(stem)
        for name in await storage.list(paths.results)
        if (stem := name.removesuffix(".pkl")).isdigit() and name.endswith(".pkl")
    ]
    statuses: dict[int, str] = {}

    async def one(item: int) -> None:
        status = await _published(storage, paths.item_result(item))
        if status is not None:
            statuses[item] = status

    async with anyio.create_task_group() as tg:  # the store's own limiter bounds them
        for item in items:
            tg.start_soon(one, item)
    return statuses


def _unpublished_failures(
    meta: dict[str, Any], job: dict[str, Any], statuses: dict[int, str]
) -> int:
    """Items of a map's failed indexes that published nothing: their pod crashed, ran
    out of time or memory, or could not read its package."""
    units = meta.get("units") or []
    failed = 0
    for index in protocol.parse_indexes(job.get("status", {}).get("failedIndexes") or ""):
        if 0 <= index < len(units):
            start, stop = units[index]
            failed += sum(1 for i in range(int(start), int(stop)) if i not in statuses)
    return failed


def _summary(
    kind: str,
    items: int,
    meta: dict[str, Any],
    job: dict[str, Any] | None,
    statuses: dict[int, str] | None,
) -> tuple[str, int, int]:
    """A job's state and its item counts ``(state, done, failed)``.

    With the job's published results (``statuses``), they decide (once every item has
    published, also while the Job controller has not marked the Job yet): a job is
    ``failed`` when any item failed (for a map: when any item
    raised or its pod ended without a result), ``succeeded`` when every item returned,
    ``finished`` when every item published but some result could not be read, and
    ``cancelled`` when items are missing without a failure. Without them (another
    user's job, a folder without ``meta.json``), the Job's own status decides.
    """
    live = job is not None and job_state(job) in ("pending", "running")
    if statuses is None:
        if job is None:
            return "unknown", 0, 0
        state_ = job_state(job)
        status = job.get("status", {})
        if kind == "map":
            done = len(list(protocol.parse_indexes(status.get("completedIndexes") or "")))
            failed = len(list(protocol.parse_indexes(status.get("failedIndexes") or "")))
        else:
            done = int(status.get("succeeded") or 0)
            failed = int(state_ == "failed")
        return state_, done, failed
    done = sum(1 for s in statuses.values() if s != "error")
    failed = len(statuses) - done
    if job is not None and live and len(statuses) < items:  # else the results decide
        return job_state(job), done, failed
    if kind == "map" and job is not None:
        failed += _unpublished_failures(meta, job, statuses)
    if failed:
        return "failed", done, failed
    if done == items:
        return ("finished" if "unknown" in statuses.values() else "succeeded"), done, failed
    if job is not None and job_state(job) == "failed":  # ended without a result
        return "failed", done, items - done
    return "cancelled", done, failed


@functools.cache
def _default_resources() -> dict[str, Any]:
    """What every job has unless asked otherwise: not worth a column."""
    from ascend._resources import Resources

    return dict(Resources.build().to_json())


def _row(
    job_id: str,
    meta: dict[str, Any] | None,
    job: dict[str, Any] | None,
    statuses: dict[int, str] | None,
) -> dict[str, Any]:
    meta = meta or {}
    labels = (job or {}).get("metadata", {}).get("labels", {})
    annotations = (job or {}).get("metadata", {}).get("annotations", {})
    status = (job or {}).get("status", {})
    items = int(meta.get("items") or (job or {}).get("spec", {}).get("completions") or 1)
    kind = meta.get("kind") or (
        "map" if (job or {}).get("spec", {}).get("completionMode") == "Indexed" else "call"
    )
    created = parse_time(meta.get("created")) or parse_time(
        (job or {}).get("metadata", {}).get("creationTimestamp")
    )
    finished = parse_time(status.get("completionTime"))
    for cond in status.get("conditions") or []:
        if cond.get("type") in ("Failed", "Complete") and cond.get("status") == "True":
            finished = finished or parse_time(cond.get("lastTransitionTime"))
    started = parse_time(status.get("startTime")) or created
    state_, done, failed = _summary(kind, items, meta, job, statuses)
    defaults = _default_resources()
    resources = {
        k: v for k, v in (meta.get("resources") or {}).items() if v and v != defaults.get(k)
    } or None
    age = (now() - created).total_seconds() if created else None
    duration = None
    if started and (finished or state_ == "running"):
        duration = ((finished or now()) - started).total_seconds()
    return {
        "job_id": job_id,
        "function": meta.get("function") or annotations.get("ascend.dev/function"),
        "kind": kind,
        "items": items,
        "state": state_,
        "done": done,
        "failed": failed,
        "created": created.isoformat() if created else None,
        "age_seconds": age,
        "age": human_age(age),
        "duration_seconds": duration,
        "duration": human_age(duration),
        "resources": resources,
        "namespace": (job or {}).get("metadata", {}).get("namespace"),
        "user": labels.get("ascend.dev/user"),
    }


async def collect(
    settings: _config.Settings, storage: Storage, *, all_users: bool = False
) -> list[dict[str, Any]]:
    """Rows for every job, newest first."""
    jobs: dict[str, dict[str, Any]] = {}
    if settings.backend == "kubernetes":
        jobs = await cluster_jobs(settings, all_users=all_users)
    metas = {} if all_users else await stored_jobs(storage, settings)
    outcomes: dict[str, dict[int, str]] = {}

    async def outcome(job_id: str) -> None:
        outcomes[job_id] = await stored_outcome(storage, settings, metas[job_id])

    # The runner publishes results before the Job controller marks the Job, and a
    # map's Job does not say which items raised: published results decide.
    async with anyio.create_task_group() as tg:
        for job_id, meta in metas.items():
            if "function" in meta:
                tg.start_soon(outcome, job_id)
    if settings.backend == "local":
        jobs = await local_jobs(settings, metas, outcomes)
    rows = [
        _row(job_id, metas.get(job_id), jobs.get(job_id), outcomes.get(job_id))
        for job_id in {*jobs, *metas}
    ]
    rows.sort(key=lambda r: r["created"] or "", reverse=True)
    return rows


@app.command("list")
@with_output
def list_jobs(
    ctx: typer.Context,
    status: str | None = typer.Option(None, help=f"only jobs in this state: {', '.join(STATES)}"),
    function: str | None = typer.Option(None, help="only jobs of this function (name)"),
    since: str | None = typer.Option(None, help="only jobs created within this (2h, 7d, ...)"),
    all_users: bool = typer.Option(False, "--all-users", help="every user's Jobs (admin view)"),
) -> None:
    """Your jobs, newest first: from the cluster's Jobs and the storage's meta.json."""
    st = state(ctx)
    if status is not None and status not in STATES:
        raise typer.BadParameter(f"--status must be one of {', '.join(STATES)}")
    window = parse_duration(since) if since else None
    try:
        settings = st.settings()
        if all_users:
            require_kubernetes(settings, "--all-users")
        from ascend._scheduler import get_scheduler

        storage = get_scheduler().storage(settings)
        try:
            rows = run(collect(settings, storage, all_users=all_users))
        except PermissionDenied as exc:
            if all_users:
                raise fail(
                    "--all-users lists the Jobs of every namespace, and your credentials may not "
                    f"list Jobs cluster-wide ({exc}). Fix: ask an admin, or drop --all-users to "
                    "see your own jobs."
                ) from None
            raise
    except AscendError as exc:
        raise guard(exc) from None
    if status:
        rows = [r for r in rows if r["state"] == status]
    if function:
        rows = [r for r in rows if r["function"] == function]
    if window is not None:
        rows = [r for r in rows if r["age_seconds"] is not None and r["age_seconds"] <= window]
    columns = (*COLUMNS, "namespace", "user") if all_users else COLUMNS
    emit(st, rows, columns, "ascend jobs")


def _one(ctx: typer.Context, job_id: str) -> tuple[_config.Settings, Storage, dict[str, Any]]:
    st = state(ctx)
    checked_job_id(job_id)
    settings = st.settings()
    from ascend._scheduler import get_scheduler

    storage = get_scheduler().storage(settings)

    async def find() -> dict[str, Any]:
        jobs: dict[str, dict[str, Any]] = {}
        if settings.backend == "kubernetes":
            jobs = await cluster_jobs(settings)
        paths = JobPaths.of(settings.user_prefix, job_id)
        try:
            meta: dict[str, Any] | None = await storage.read_json(paths.meta)
        except FileNotFoundError:
            meta = None
        if meta is None and job_id not in jobs:
            if settings.backend == "kubernetes":
                where = f"no Job in namespace {settings.namespace or 'default'} and no folder"
                flags = "--storage, --project, --user and --namespace"
            else:
                where, flags = "no folder", "--storage, --project and --user"
            raise AscendError(
                f"no job {job_id!r}: {where} under {settings.user_prefix}/jobs. Fix: check the "
                f"id (ascend jobs list) and that {flags} are the ones it was submitted with."
            )
        outcome = None
        if meta is not None and "function" in meta:
            outcome = await stored_outcome(storage, settings, {**meta, "job_id": job_id})
            if settings.backend == "local":
                jobs = await local_jobs(settings, {job_id: meta}, {job_id: outcome})
        job = jobs.get(job_id)
        row = _row(job_id, meta, job, outcome)
        row["storage"] = paths.root
        row["meta"] = meta
        return row

    return settings, storage, run(find())


@app.command()
@with_output
def status(ctx: typer.Context, job_id: str) -> None:
    """One job's state, counts, times and resources."""
    try:
        _, _, row = _one(ctx, job_id)
    except AscendError as exc:
        raise guard(exc) from None
    emit_object(state(ctx), row)


async def _stored_logs(storage: Storage, paths: JobPaths) -> list[str]:
    lines: list[str] = []
    # Kubernetes: logs/<pod>.log per attempt; the local backend (detached): output-<n>.log
    urls = [f"{paths.logs}/{n}" for n in await storage.list(paths.logs) if n.endswith(".log")]
    urls += [f"{paths.root}/{n}" for n in await storage.list(paths.root) if n.startswith("output-")]
    for url in urls:
        data = bytes(await storage.read(url))
        lines.extend(data.decode(errors="replace").splitlines())
    return lines


async def _pod_logs(settings: _config.Settings, job_id: str) -> list[str] | None:
    """The current output of the job's pods, or None when it has no pod left."""
    from ascend.backends._kubernetes._client import Api, ApiError

    namespace = settings.namespace or "default"
    api = await Api.connect(settings)
    try:
        pods = await api.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods",
            query={"labelSelector": f"ascend.dev/job-id={job_id}"},
        )
        items = sorted(
            pods.get("items") or [], key=lambda p: p["metadata"].get("creationTimestamp", "")
        )
        if not items:
            return None
        lines: list[str] = []
        for pod in items:
            name = pod["metadata"]["name"]
            path = f"/api/v1/namespaces/{namespace}/pods/{name}/log"
            try:
                lines.extend(
                    [
                        raw.decode(errors="replace").rstrip("\n")
                        async for raw in api.stream_lines(path, {}, read_timeout=30)
                    ]
                )
            except ApiError:
                continue
        return lines
    finally:
        await api.close()


@app.command()
@with_output
def logs(
    ctx: typer.Context,
    job_id: str,
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until it ends"),
) -> None:
    """A job's output: live from its pods while they exist, else the stored copy. With
    ``--output json``, the output so far as one object (``job_id``, ``lines``)."""
    import ascend

    st = state(ctx)
    if follow and st.json:
        raise typer.BadParameter(
            "--follow prints lines as they come, --output json the output so far as one "
            "object. Fix: drop one of them."
        )
    try:
        settings, storage, row = _one(ctx, job_id)
        paths = JobPaths.of(settings.user_prefix, job_id)
        live = row["state"] in ("pending", "running")
        if follow and live and settings.backend == "local":
            _follow_local(ctx, storage, paths, job_id)
            return
        if follow and live:
            if row["kind"] == "call":
                printed = 0
                for line in ascend.Future.attach(job_id).logs(follow=True):
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
                    printed += 1
                if not printed:  # it finished as it was attached: its output is stored
                    for line in run(_stored_logs(storage, paths)):
                        sys.stdout.write(line + "\n")
            else:  # every item's output, prefixed, as the library prints it
                _config.configure(stream_logs=True)
                mf = ascend.MapFuture.attach(job_id, return_exceptions=True)
                list(mf)
            return
        lines: list[str] | None = None
        if live and settings.backend == "kubernetes":
            lines = run(_pod_logs(settings, job_id))
        if lines is None:
            lines = run(_stored_logs(storage, paths))
    except AscendError as exc:
        raise guard(exc) from None
    if st.json:
        emit_object(st, {"job_id": job_id, "lines": lines})
        return
    for line in lines:
        sys.stdout.write(line + "\n")


def _follow_local(ctx: typer.Context, storage: Storage, paths: JobPaths, job_id: str) -> None:
    """Print a local job's stored output as it grows, until its runners are gone (the
    local backend cannot follow a job another process started through a future)."""
    import time

    printed = 0
    while True:
        _, _, row = _one(ctx, job_id)  # the state first: no line written before it is missed
        lines = run(_stored_logs(storage, paths))
        for line in lines[printed:]:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
        printed = max(printed, len(lines))
        if row["state"] not in ("pending", "running"):
            return
        time.sleep(0.5)


@app.command()
@with_output
def cancel(ctx: typer.Context, job_id: str) -> None:
    """Stop a running job, as ``fut.cancel()`` does: on Kubernetes delete its Job (and so
    its pods); on the local backend stop its runner processes on this machine."""
    st = state(ctx)
    try:
        checked_job_id(job_id)
        settings = st.settings()
        if settings.backend == "local":
            _cancel_local(st, settings, job_id)
            return
        require_kubernetes(settings, "ascend jobs cancel")
        deleted = run(delete_job(settings, job_id))
    except AscendError as exc:
        raise guard(exc) from None
    if not deleted:
        raise fail(
            f"job {job_id!r} has no Job in namespace {settings.namespace or 'default'} for user "
            f"{settings.user}: it has finished and been cleaned up, or is not yours."
        )
    emit_object(st, {"job_id": job_id, "cancelled": True})


def _cancel_local(st: Any, settings: _config.Settings, job_id: str) -> None:
    from ascend.backends import _local_records

    root = JobPaths.of(settings.user_prefix, job_id).root
    stopped = _local_records.stop(root, job_id)
    if not stopped:
        raise fail(
            f"job {job_id!r} has no running runner on this machine under "
            f"{settings.user_prefix}/jobs: it has finished or was cancelled (ascend jobs "
            f"status {job_id}), or it runs on another machine or with other --storage, "
            "--project or --user settings."
        )
    emit_object(st, {"job_id": job_id, "cancelled": True, "units": stopped})


async def delete_job(settings: _config.Settings, job_id: str) -> bool:
    """Delete one of this user's Jobs; False when there is none."""
    return bool(await delete_jobs(settings, [job_id]))


async def delete_jobs(settings: _config.Settings, job_ids: list[str]) -> list[str]:
    """Delete these of this user's Jobs (one listing, background propagation, UID
    preconditions, so a same-named successor is never hit); the ids deleted."""
    from ascend.backends._kubernetes._client import Api, ApiError

    jobs = await cluster_jobs(settings)
    found = [jobs[j] for j in job_ids if j in jobs]
    deleted: list[str] = []
    if not found:
        return deleted
    api = await Api.connect(settings)

    async def one(job: dict[str, Any]) -> None:
        meta = job["metadata"]
        try:
            await api.request(
                "DELETE",
                f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{meta['name']}",
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": "Background",
                    "preconditions": {"uid": meta["uid"]},
                },
            )
        except ApiError as exc:
            if exc.status in (404, 409):
                return
            raise
        deleted.append(meta.get("labels", {}).get("ascend.dev/job-id", meta["name"]))

    try:
        async with anyio.create_task_group() as tg:
            for job in found:
                tg.start_soon(one, job)
    finally:
        await api.close()
    return deleted


@app.command()
@with_output
def result(
    ctx: typer.Context,
    job_id: str,
    save: Path | None = typer.Option(None, help="write the value, pickled, to this file"),
) -> None:
    """A finished job's published value (a map: the list of item values or errors)."""
    import cloudpickle

    import ascend

    st = state(ctx)
    try:
        _, _, row = _one(ctx, job_id)
    except AscendError as exc:
        raise guard(exc) from None
    if row["state"] in ("pending", "running"):
        raise fail(f"job {job_id} is {row['state']}: no result yet. Fix: try again later.")
    try:
        if row["kind"] == "call":
            value: Any = ascend.Future.attach(job_id).result()
        else:
            value = list(ascend.MapFuture.attach(job_id, return_exceptions=True))
    except AscendError as exc:
        raise guard(exc) from None
    except Exception as exc:  # the function's own exception, rebuilt
        if st.json:
            emit_object(st, {"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"})
        else:
            fail(f"the function raised {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    if save is not None:
        save.write_bytes(cloudpickle.dumps(value))
    emit_object(st, {"job_id": job_id, "value": _jsonable(value), "saved": str(save or "")})


def _jsonable(value: Any) -> Any:
    import json

    try:
        json.dumps(value)
    except (TypeError, ValueError):
        if isinstance(value, list):
            return [_jsonable(v) for v in value]
        return repr(value)
    return value
