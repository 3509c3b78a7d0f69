"""Building a function's environment in the cluster, as one Job per environment.

An archive in storage (bucket mode), or an image pushed to ``registry`` (registry mode,
with the ``registry_secret``'s credentials mounted into the build pod). The Job's name
is derived from the environment's key, so concurrent requests — from this process or
any other client — create it once: a create conflict means "already building", and the
request waits for that Job instead. The build pod's output streams to the caller; a
failed Job raises :class:`ascend.ImageBuildError` with its log tail.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

import anyio

from ascend import _environments as envs
from ascend._config import Settings
from ascend._errors import ConfigError, ImageBuildError, PermissionDenied, StartupTimeout
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
    with _within_startup_timeout(settings, spec, envs.build_job_name(spec.key)):
        return await _ensure(api, namespace, settings, spec, storage, on_line)


async def ensure_image_in_cluster(
    api: Api,
    namespace: str,
    settings: Settings,
    spec: envs.EnvironmentSpec,
    storage: Storage,
    on_line: Callable[[str], None],
) -> str:
    """The environment of ``spec`` as an image in ``settings.registry``
    (``host/repository@sha256:...``): found by its tag, or built and pushed by a build
    Job with the ``registry_secret``'s credentials.

    Raises:
        ImageBuildError: the build Job failed (requirement or registry, log tail), or
            the registry refused this client's lookup.
        StartupTimeout: it did not finish within ``startup_timeout``.
        ConfigError: the registry setting is unusable, or ``registry_secret`` names a
            Secret that does not exist.
    """
    assert settings.registry is not None
    name = envs.image_build_job_name(spec.key, settings.registry)
    with _within_startup_timeout(settings, spec, name):
        return await _ensure_image(api, namespace, settings, spec, storage, on_line, name)


@contextlib.contextmanager
def _within_startup_timeout(
    settings: Settings, spec: envs.EnvironmentSpec, name: str
) -> Iterator[None]:
    try:
        with anyio.fail_after(settings.startup_timeout):
            yield
    except TimeoutError as exc:
        raise StartupTimeout(
            f"environment {spec.key[:12]}: the build Job {name} did not finish within "
            f"startup_timeout={settings.startup_timeout:g} s. Fix: raise startup_timeout, "
            "or build it ahead with `ascend env build`."
        ) from exc


async def _upload_runner(settings: Settings, spec: envs.EnvironmentSpec, storage: Storage) -> str:
    """The runner's source archive in storage; returns where the build pod fetches it."""
    runner = envs.runner_url(settings, spec.runner)
    archive = await anyio.to_thread.run_sync(envs.runner_archive)
    await storage.put_blob(runner, memoryview(archive), hashlib.sha256(archive).hexdigest())
    return await envs.fetch_url(storage, runner)


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
    request = envs.build_request(
        spec,
        runner=await _upload_runner(settings, spec, storage),
        archive=await envs.write_url(storage, paths.archive),
        manifest=await envs.write_url(storage, paths.manifest),
        failure=await envs.write_url(storage, paths.failure),
    )
    manifest = envs.build_job_manifest(spec, request, startup_timeout=settings.startup_timeout)
    build = _Build(api, namespace, manifest, storage, paths.failure, on_line)
    await build.run(lambda: storage.exists(paths.manifest))
    found = await envs._load(storage, paths, spec)
    if found is not None:
        return envs.Environment(spec, found.archive, found.sha256, found.size, built=build.created)
    if build.outcome.get("type") == "Complete":
        raise ImageBuildError(
            f"environment {spec.key[:12]}: build Job {build.name} succeeded, but its archive "
            f"is not in {paths.folder}: the build pod wrote where this client cannot read (a "
            "file:// storage that is not the same folder on every node?). Fix: use object "
            "storage, or build on this machine with build='local'.",
            log="\n".join(build.tail),
        )
    raise await build.error(spec)


async def _ensure_image(
    api: Api,
    namespace: str,
    settings: Settings,
    spec: envs.EnvironmentSpec,
    storage: Storage,
    on_line: Callable[[str], None],
    name: str,
) -> str:
    from ascend import _registry

    registry = settings.registry
    assert registry is not None
    _registry._base_location(spec, _registry.parse_target(registry))  # elsewhere: refused
    if settings.registry_secret:  # also when the image exists: pods pull with it
        await _check_secret(api, namespace, settings.registry_secret)
    found = await _registry.find_image(spec, registry)
    if found is not None:
        return found.ref
    await _registry.check_base(spec, registry)  # before a build Job that would fail on it
    paths = envs.EnvPaths.of(settings, spec.key)
    try:  # where a failure's log goes; without presigned writes, only the pod's output
        failure: str | None = await envs.write_url(storage, paths.failure)
    except ConfigError:
        failure = None
    request = envs.build_request(
        spec,
        runner=await _upload_runner(settings, spec, storage),
        failure=failure,
        registry=registry,
    )
    manifest = envs.build_job_manifest(
        spec,
        request,
        startup_timeout=settings.startup_timeout,
        name=name,
        registry_secret=settings.registry_secret,
    )

    async def pushed() -> bool:
        return await _registry.find_image(spec, registry) is not None

    build = _Build(api, namespace, manifest, storage, paths.failure if failure else None, on_line)
    await build.run(pushed)
    found = await _registry.find_image(spec, registry)
    if found is not None:
        return found.ref
    if build.outcome.get("type") == "Complete":
        raise ImageBuildError(
            f"environment {spec.key[:12]}: build Job {name} succeeded, but {registry} has no "
            f"image tagged {spec.key}: the build pod pushed where this client does not look "
            "(a registry address that differs between this machine and the cluster?). Fix: "
            "use a registry address both reach.",
            log="\n".join(build.tail),
        )
    raise await build.error(spec)


_secrets_seen: dict[tuple[str, str], float] = {}
_SECRET_FRESH: Final = 300.0


async def _check_secret(api: Api, namespace: str, secret: str) -> None:
    """A missing ``registry_secret`` fails at once (a build pod would wait for its volume
    until ``startup_timeout``; a kubelet pulls without it and is refused). Once found,
    not asked again for 5 minutes; without permission to read Secrets, skipped."""
    seen = _secrets_seen.get((namespace, secret))
    if seen is not None and time.monotonic() - seen < _SECRET_FRESH:
        return
    try:
        await api.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{secret}")
        _secrets_seen[(namespace, secret)] = time.monotonic()
    except PermissionDenied:
        return
    except ApiError as exc:
        if exc.status == 404:
            raise ConfigError(
                f"registry_secret {secret!r}: no such Secret in namespace {namespace}. Fix: "
                f"create it (`kubectl create secret docker-registry {secret} -n {namespace} "
                "--docker-server=HOST --docker-username=USER --docker-password=TOKEN`), or "
                "unset registry_secret for a registry that needs no credentials."
            ) from exc
        if exc.status != 403:
            raise


class _Build:
    """One build Job: created (or joined, when another request created it), followed to
    its end with its output streamed, and its failure read back."""

    def __init__(
        self,
        api: Api,
        namespace: str,
        manifest: dict[str, Any],
        storage: Storage,
        failure: str | None,
        on_line: Callable[[str], None],
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.manifest = manifest
        self.name: str = manifest["metadata"]["name"]
        self.storage = storage
        self.failure = failure
        self.on_line = on_line
        self.created = False
        self.outcome: dict[str, Any] = {}
        self.tail: deque[str] = deque(maxlen=_TAIL)
        self.jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs"

    async def run(self, exists: Callable[[], Awaitable[bool]]) -> None:
        """Create the Job, or wait for the one that exists; ``exists`` says whether a
        finished Job's environment is still there (else it is replaced)."""
        api, jobs, name = self.api, self.jobs, self.name
        while True:
            try:
                if self.failure is not None:
                    await self.storage.delete(self.failure)
                await api.request("POST", jobs, body=self.manifest)
                self.created = True
                self.on_line(f"building environment in build Job {name}")
            except ApiError as exc:
                if exc.status != 409:
                    raise
                existing = await api.request("GET", f"{jobs}/{name}")
                done = _condition(existing)
                if done is not None and (done["type"] == "Failed" or not await exists()):
                    # A finished build this request did not watch (failed earlier, or its
                    # environment pruned since): replace it.
                    await _delete_and_wait(api, jobs, name, existing["metadata"]["uid"])
                    continue
                self.on_line(f"waiting for build Job {name} (started by another request)")
            break

        def line(text: str) -> None:
            self.tail.append(text)
            self.on_line(text)

        logs_done = anyio.Event()

        async def logs() -> None:
            try:
                await _stream_logs(api, self.namespace, name, line, lambda: not self.outcome)
            finally:
                logs_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(logs)
            while not self.outcome:
                try:
                    current = await api.request("GET", f"{jobs}/{name}")
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    current = {}  # finished and collected: the result says how it went
                    self.outcome["type"] = "Gone"
                done = _condition(current)
                if done is not None:
                    self.outcome.update(done)
                else:
                    await anyio.sleep(_POLL)
            with anyio.move_on_after(5):  # the follower drains what is left, then returns
                await logs_done.wait()
            tg.cancel_scope.cancel()

    async def error(self, spec: envs.EnvironmentSpec) -> ImageBuildError:
        """The failed build as the caller's error: the failing requirement, or the
        registry's refusal, with the log's tail."""
        lines = list(self.tail)
        said = [line for line in lines if line.startswith(_FAILED)]
        if self.failure is not None:
            try:
                failure = await self.storage.read_json(self.failure)
                lines = str(failure.get("log", "")).splitlines() or lines
                said.append(f"{_FAILED}{failure.get('message', '')}")
            except FileNotFoundError:
                pass
        reason = f"build Job {self.name}: {self.outcome.get('reason') or self.outcome.get('type')}"
        for text in said:
            if text.startswith(_PUSH_FAILED):  # the registry's answer, not the requirements
                return ImageBuildError(
                    f"environment {spec.key[:12]} ({reason}): {text.removeprefix(_FAILED)}\n"
                    "Last lines of the build log:\n" + "\n".join(lines),
                    log="\n".join(lines),
                )
        error = envs.build_error(spec, lines, reason, in_cluster=True)
        return ImageBuildError(str(error), requirement=error.requirement, log=error.log)


_FAILED: Final = "ascend-build: failed: "
_PUSH_FAILED: Final = f"{_FAILED}pushing the image failed:"


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
