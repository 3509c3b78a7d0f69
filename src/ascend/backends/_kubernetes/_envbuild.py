"""Building a function's environment in the cluster, as one Job per environment.

The Job's name is derived from the environment's key, so concurrent requests — from
this process or any other client — create it once: a create conflict means "already
building", and the request waits for that Job instead. The build pod's output streams
to the caller; a failed Job raises :class:`ascend.ImageBuildError` with its log tail.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import anyio

from ascend import _environments as envs
from ascend._config import Settings
from ascend._errors import ImageBuildError, StartupTimeout
from ascend._logging import logger
from ascend._storage import Storage
from ascend.backends._kubernetes import _logs
from ascend.backends._kubernetes._client import Api, ApiError
from ascend_runner.framing import LineFramer

log = logger

_POLL: Final = 1.0
_TAIL: Final = 40


def _condition(job: dict[str, Any]) -> dict[str, Any] | None:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return dict(cond)
    return None


async def ensure_in_cluster(
    api: Api,
    namespace: str,
    settings: Settings,
    spec: envs.EnvironmentSpec,
    storage: Storage,
    on_line: Callable[[str], None],
) -> envs.Environment:
    """The environment of ``spec``: found in storage, or built by a build Job.

    Raises:
        ImageBuildError: the build Job failed (requirement, log tail, the way out).
        StartupTimeout: it did not finish within ``startup_timeout``.
        ConfigError: the storage cannot take a build pod's writes (build locally then).
    """
    try:
        with anyio.fail_after(settings.startup_timeout):
            return await _ensure(api, namespace, settings, spec, storage, on_line)
    except TimeoutError as exc:
        raise StartupTimeout(
            f"environment {spec.key[:12]}: the build Job {envs.build_job_name(spec.key)} did "
            f"not finish within startup_timeout={settings.startup_timeout:g} s. Fix: raise "
            "startup_timeout, or build it ahead with `ascend env build`."
        ) from exc


async def _ensure(
    api: Api,
    namespace: str,
    settings: Settings,
    spec: envs.EnvironmentSpec,
    storage: Storage,
    on_line: Callable[[str], None],
) -> envs.Environment:
    paths = envs.EnvPaths.of(settings, spec.key)
    found = await envs._load(storage, paths, spec)
    if found is not None:
        return found
    runner = envs.runner_url(settings, spec.runner)
    archive = await anyio.to_thread.run_sync(envs.runner_archive)
    await storage.put_blob(runner, memoryview(archive), hashlib.sha256(archive).hexdigest())
    request = envs.build_request(
        spec,
        runner=await envs.fetch_url(storage, runner),
        archive=await envs.write_url(storage, paths.archive),
        manifest=await envs.write_url(storage, paths.manifest),
        failure=await envs.write_url(storage, paths.failure),
    )
    manifest = envs.build_job_manifest(spec, request, startup_timeout=settings.startup_timeout)
    name = manifest["metadata"]["name"]
    jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    built = False
    while True:
        try:
            await storage.delete(paths.failure)
            await api.request("POST", jobs, body=manifest)
            built = True
            on_line(f"building environment {spec.key[:12]} in build Job {name}")
        except ApiError as exc:
            if exc.status != 409:
                raise
            existing = await api.request("GET", f"{jobs}/{name}")
            done = _condition(existing)
            if done is not None and (
                done["type"] == "Failed" or not await storage.exists(paths.manifest)
            ):
                # A finished build this request did not watch (failed earlier, or its
                # environment pruned since): replace it.
                await _delete_and_wait(api, jobs, name, existing["metadata"]["uid"])
                continue
            on_line(f"waiting for build Job {name} (started by another request)")
        break
    tail: deque[str] = deque(maxlen=_TAIL)

    def line(text: str) -> None:
        tail.append(text)
        on_line(text)

    outcome: dict[str, Any] = {}
    logs_done = anyio.Event()

    async def logs() -> None:
        try:
            await _stream_logs(api, namespace, name, line, lambda: not outcome)
        finally:
            logs_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(logs)
        while not outcome:
            try:
                current = await api.request("GET", f"{jobs}/{name}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
                current = {}  # finished and collected: storage says how it went
                outcome["type"] = "Gone"
            done = _condition(current)
            if done is not None:
                outcome.update(done)
            else:
                await anyio.sleep(_POLL)
        with anyio.move_on_after(5):  # the follower drains what is left, then returns
            await logs_done.wait()
        tg.cancel_scope.cancel()
    found = await envs._load(storage, paths, spec)
    if found is not None:
        return envs.Environment(spec, found.archive, found.sha256, found.size, built=built)
    if outcome.get("type") == "Complete":
        raise ImageBuildError(
            f"environment {spec.key[:12]}: build Job {name} succeeded, but its archive is not "
            f"in {paths.folder}: the build pod wrote where this client cannot read (a file:// "
            "storage that is not the same folder on every node?). Fix: use object storage, "
            "or build on this machine with build='local'.",
            log="\n".join(tail),
        )
    lines = list(tail)
    try:
        failure = await storage.read_json(paths.failure)
        lines = str(failure.get("log", "")).splitlines() or lines
    except FileNotFoundError:
        pass
    error = envs.build_error(
        spec,
        lines,
        f"build Job {name}: {outcome.get('reason') or outcome.get('type')}",
        in_cluster=True,
    )
    raise ImageBuildError(str(error), requirement=error.requirement, log=error.log)


async def _delete_and_wait(api: Api, jobs: str, name: str, uid: str) -> None:
    body = {
        "kind": "DeleteOptions",
        "apiVersion": "v1",
        "propagationPolicy": "Background",
        "preconditions": {"uid": uid},
    }
    try:
        await api.request("DELETE", f"{jobs}/{name}", body=body)
    except ApiError as exc:
        if exc.status not in (404, 409):
            raise
    while True:
        try:
            await api.request("GET", f"{jobs}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return
            raise
        await anyio.sleep(_POLL)


class _LineOutput:
    """A build pod's output, cut into lines for ``on_line``."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._framer = LineFramer(0)
        self._on_line = on_line

    def _deliver(self, batches: list[tuple[int, list[str]]]) -> None:
        for _, lines in batches:
            for line in lines:
                self._on_line(line)

    def feed(self, data: bytes) -> None:
        self._deliver(self._framer.feed(data))

    def end(self) -> None:
        self._deliver(self._framer.end())

    async def room(self) -> None:
        """Build output is small: never held back."""


async def _stream_logs(
    api: Api,
    namespace: str,
    name: str,
    on_line: Callable[[str], None],
    still_running: Callable[[], bool],
) -> None:
    """Follow the build pod's output once it exists."""
    pods = f"/api/v1/namespaces/{namespace}/pods"
    while still_running():
        listed = await api.request("GET", pods, query={"labelSelector": f"job-name={name}"})
        items = listed.get("items") or []
        if items:
            output = _LineOutput(on_line)
            await _logs.follow(api, namespace, items[0]["metadata"]["name"], output, still_running)
            return
        await anyio.sleep(_POLL)
