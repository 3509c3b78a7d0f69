"""The Kubernetes backend: every call a Job, followed by shared watches.

Per namespace, one watch follows this user's Jobs, one their pods and one the Jobs'
``FailedCreate`` events, whatever the number of calls in flight. Each call's outcome is
decided from those events as soon as the cause is known — scheduler refusals, image pull
errors, OOM kills, deadlines, exit codes — and its pod's output is streamed back live.
Cancelling deletes the Job (background propagation, UID precondition), which stops its
pod.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections import deque
from typing import Any

import anyio

from ascend._config import Settings
from ascend._errors import (
    AscendError,
    DeadlineExceeded,
    ImagePullError,
    OOMKilled,
    Unschedulable,
    VersionMismatch,
    WorkerFailed,
)
from ascend._logging import logger
from ascend.backends import ItemOutput, Job, JobObserver
from ascend.backends._kubernetes import _logs
from ascend.backends._kubernetes._client import Api, ApiError
from ascend.backends._kubernetes._spec import (
    LABEL_MANAGED,
    LABEL_USER,
    SIGNING_KEY_FIELD,
    job_manifest,
    signing_secret_name,
)
from ascend.backends._kubernetes._watch import Informer, involved_job
from ascend_runner import protocol

log = logger

_IMAGE_ERRORS = {"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable"}
_CONFIG_ERRORS = {"CreateContainerConfigError", "CreateContainerError"}
_TAIL = 20
_MAX_LOG_STREAMS = 48
_LOG_DRAIN = 5.0
_LATE_POD_EVENTS = 2.0
_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def _true_condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def _index_of(pod: dict[str, Any]) -> int:
    """The completion index of an Indexed Job's pod (0 for a single call's)."""
    annotations = pod.get("metadata", {}).get("annotations") or {}
    try:
        return int(annotations.get(_INDEX_ANNOTATION, 0))
    except ValueError:
        return 0


class _Namespace:
    """The API client and the two shared watches of one namespace."""

    def __init__(self, api: Api, namespace: str, user: str) -> None:
        self.api = api
        self.namespace = namespace
        selector = f"{LABEL_MANAGED}=ascend,{LABEL_USER}={user}"
        self.jobs = Informer(
            api, f"/apis/batch/v1/namespaces/{namespace}/jobs", "jobs", label_selector=selector
        )
        self.pods = Informer(
            api, f"/api/v1/namespaces/{namespace}/pods", "pods", label_selector=selector
        )
        # Pods that are never created (quota, admission) show only as Job events.
        self.events = Informer(
            api,
            f"/api/v1/namespaces/{namespace}/events",
            "events",
            field_selector="involvedObject.kind=Job,reason=FailedCreate",
            key=involved_job,
        )

        self.log_streams = anyio.Semaphore(_MAX_LOG_STREAMS)
        self._tasks = [
            asyncio.get_running_loop().create_task(i.run())
            for i in (self.jobs, self.pods, self.events)
        ]
        self._secrets: set[str] = set()

    async def ensure_signing_secret(self, job: Job) -> str:
        """The Secret that gives pods this user's signing key (created on first use)."""
        name = signing_secret_name(job.settings.user, job.signing_key)
        if name in self._secrets:
            return name
        path = f"/api/v1/namespaces/{self.namespace}/secrets"
        try:
            await self.api.request("GET", f"{path}/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": name,
                    "labels": {LABEL_MANAGED: "ascend", LABEL_USER: job.settings.user},
                },
                "type": "Opaque",
                "data": {
                    SIGNING_KEY_FIELD: base64.b64encode(job.signing_key.hex().encode()).decode()
                },
            }
            try:
                await self.api.request("POST", path, body=secret)
            except ApiError as race:
                if race.status != 409:
                    raise
        self._secrets.add(name)
        return name


class _Tracker:
    """Decides one Job's outcome from watch events, and streams its pods' output."""

    def __init__(self, job: Job, observer: JobObserver, ns: _Namespace, grace: float) -> None:
        self.job = job
        self.observer = observer
        self.ns = ns
        self.grace = grace
        self.done = anyio.Event()
        self.uid: str | None = None
        self.pods: dict[str, dict[str, Any]] = {}
        self.tail: deque[str] = deque(maxlen=_TAIL)
        self._not_created_task: asyncio.Task[None] | None = None
        self._started: set[int] = set()
        self._settled: set[int] = set()
        self._pod_logs: dict[str, asyncio.Task[None]] = {}
        self._ever_scheduled = False
        self.errors: list[AscendError] = []
        self._notified = 0
        self._unschedulable_task: asyncio.Task[None] | None = None
        self._where = f"{job.name} (job {job.job_id})"
        # A map's pods are not followed one stream each unless their output is to be
        # printed live: the connections would grow with the map. An item's output is
        # streamed when someone reads its logs while it runs, and read from the
        # runner's copies in storage once it has finished.
        self._live = not job.is_map or job.settings.stream_logs is True
        self._requested: set[int] = set()
        if not self._live:
            observer.output_on_request(self.follow_item)

    # -- outcome -----------------------------------------------------------------------

    def _finish(self, error: AscendError | None = None) -> None:
        """Settle every work unit that has no outcome yet."""
        for index in range(len(self.job.units)):
            self._settle(index, error)

    def _settle(self, index: int, error: AscendError | None) -> None:
        """One unit's outcome: its results are published, or ``error``."""
        if index in self._settled or index >= len(self.job.units):
            return
        self._settled.add(index)
        items = self.job.units[index].items
        if not self._live and index not in self._requested:
            self.observer.output_copies(items, self._copies(index))
        if error is not None:
            self.errors.append(error)
            self.observer.failed(items, error)
            self._check_done()
            return
        # The outcome can be known before the last lines arrive: let them in first.
        waits = [
            t for name, t in self._pod_logs.items() if _index_of(self.pods.get(name, {})) == index
        ]
        asyncio.get_running_loop().create_task(self._finished_after(waits, items))

    async def _finished_after(self, waits: list[asyncio.Task[None]], items: range) -> None:
        if waits:
            await asyncio.wait(waits, timeout=_LOG_DRAIN)
        self.observer.finished(items)
        self._notified += 1
        self._check_done()

    def _check_done(self) -> None:
        if len(self._settled) == len(self.job.units) and self._notified + len(self.errors) >= len(
            self.job.units
        ):
            self.done.set()

    def on_job(self, kind: str, obj: dict[str, Any]) -> None:
        if self.uid and obj["metadata"].get("uid") != self.uid:
            return  # a same-named predecessor or successor
        if kind == "DELETED":
            self._finish(WorkerFailed(f"{self._where}: its Job was deleted before it finished."))
            return
        status = obj.get("status", {})
        for index in protocol.parse_indexes(status.get("completedIndexes") or ""):
            self._settle(index, None)
        for index in protocol.parse_indexes(status.get("failedIndexes") or ""):
            # The Job and pod watches are not ordered: decide once the pod is seen.
            if self._last_termination(index) is not None:
                self._settle(index, self._diagnose({"reason": "FailedIndexes"}, index))
        if _true_condition(obj, "Complete") or _true_condition(obj, "SuccessCriteriaMet"):
            self._finish()
            return
        failure = _true_condition(obj, "FailureTarget") or _true_condition(obj, "Failed")
        if failure is not None:
            for index in range(len(self.job.units)):
                if self._last_termination(index) is not None:
                    self._settle(index, self._diagnose(failure, index))
            if len(self._settled) < len(self.job.units):
                asyncio.get_running_loop().create_task(self._settle_late(failure))

    async def _settle_late(self, failure: dict[str, Any]) -> None:
        """Give pod events that trail the Job's failure a moment, then settle the rest."""
        await anyio.sleep(_LATE_POD_EVENTS)
        for index in range(len(self.job.units)):
            self._settle(index, self._diagnose(failure, index))

    def _copies(self, index: int) -> list[str]:
        """Where the runner stored each attempt's output for this index, oldest first."""
        started = sorted(
            (pod["metadata"].get("creationTimestamp", ""), name)
            for name, pod in self.pods.items()
            if _index_of(pod) == index
            and any(
                "running" in c.get("state", {}) or "terminated" in c.get("state", {})
                for c in pod.get("status", {}).get("containerStatuses") or []
            )
        )
        return [f"{self.job.paths.logs}/{name}.log" for _, name in started]

    def _last_termination(self, index: int) -> tuple[str, dict[str, Any]] | None:
        latest: tuple[str, dict[str, Any]] | None = None
        for name, pod in self.pods.items():
            if _index_of(pod) != index:
                continue
            for status in pod.get("status", {}).get("containerStatuses") or []:
                terminated = status.get("state", {}).get("terminated")
                if terminated and (
                    latest is None
                    or terminated.get("finishedAt", "") >= latest[1].get("finishedAt", "")
                ):
                    latest = (name, terminated)
        return latest

    def _diagnose(self, condition: dict[str, Any], index: int = 0) -> AscendError | None:
        """The error for a failed Job, or None when the failure is the function's own
        exception (its result, published by the runner, says what it was)."""
        reason = condition.get("reason", "")
        logs = "\n".join(self.tail)
        timed_out = reason == "DeadlineExceeded" or any(
            p.get("status", {}).get("reason") == "DeadlineExceeded"
            for p in self.pods.values()
            if _index_of(p) == index
        )
        if timed_out:
            return DeadlineExceeded(
                f"{self._where} ran past its timeout of {self.job.resources.timeout:g} s and was "
                "stopped. Fix: raise timeout=... or give it less work per call."
            )
        last = self._last_termination(index)
        if last is None:
            return WorkerFailed(
                f"{self._where}: Job failed ({reason}: {condition.get('message', '')}).", logs=logs
            )
        pod, terminated = last
        code = int(terminated.get("exitCode", -1))
        if code == protocol.ExitCode.USER_EXCEPTION:
            return None
        if terminated.get("reason") == "OOMKilled":
            return OOMKilled(
                f"{self._where}: pod {pod} was killed for exceeding its memory limit of "
                f"{self.job.resources.memory or 'the namespace default'} (OOMKilled). Fix: "
                "raise memory=... or use less memory per call.",
                exit_code=code,
                logs=logs,
            )
        if code == protocol.ExitCode.VERSION_MISMATCH:
            return VersionMismatch(
                f"{self._where}: the runner in pod {pod} refused the package: "
                f"{terminated.get('message', '').strip()}"
            )
        if code in protocol.ExitCode.reserved():
            meaning = protocol.ExitCode(code).name.lower().replace("_", " ")
            return WorkerFailed(
                f"{self._where}: the runner in pod {pod} failed ({meaning}, exit code {code}): "
                f"{terminated.get('message', '').strip()}",
                exit_code=code,
                logs=logs,
            )
        return WorkerFailed(
            f"{self._where}: pod {pod} failed with exit code {code} "
            f"({terminated.get('reason', '')}) "
            f"without publishing a result; Job condition {reason}. Last output:\n{logs}",
            exit_code=code,
            logs=logs,
        )

    def on_pod(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            return
        self.pods[name] = obj
        index = _index_of(obj)
        status = obj.get("status", {})
        containers = status.get("containerStatuses") or []
        state = containers[0].get("state", {}) if containers else {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in _IMAGE_ERRORS:
            image = containers[0].get("image", "")
            self._finish(
                ImagePullError(
                    f"{self._where}: pod {name} cannot pull image {image!r}: {waiting['reason']}: "
                    f"{waiting.get('message', '')}. Fix: check that image=... / ASCEND_IMAGE "
                    "names an image "
                    "the cluster can pull."
                )
            )
            return
        if waiting.get("reason") in _CONFIG_ERRORS:
            self._finish(
                WorkerFailed(
                    f"{self._where}: pod {name} cannot start: {waiting.get('message', '')}"
                )
            )
            return
        disrupted = _true_condition(obj, "DisruptionTarget")
        if disrupted and self.job.resources.retries == 0:
            # Evicted, preempted or its node lost. Disruptions do not count against
            # retries, but with none allowed the caller should know now, not when (or
            # if) the node comes back.
            self._settle(
                index,
                WorkerFailed(
                    f"{self._where}: pod {name} on node {obj['spec'].get('nodeName')} was "
                    f"disrupted ({disrupted.get('reason')}: {disrupted.get('message', '')}). Fix: "
                    "set retries=... to run it again elsewhere when this happens."
                ),
            )
            return
        scheduled = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None
        )
        if obj.get("spec", {}).get("nodeName"):
            self._ever_scheduled = True
        if (
            scheduled
            and scheduled.get("status") == "False"
            and scheduled.get("reason") == "Unschedulable"
            and not self._ever_scheduled  # with pods running, the rest are just queued
        ):
            if self._unschedulable_task is None:
                self._unschedulable_task = asyncio.get_running_loop().create_task(
                    self._unschedulable(name)
                )
        elif self._unschedulable_task is not None:
            self._unschedulable_task.cancel()
            self._unschedulable_task = None
        terminated = state.get("terminated") or {}
        if terminated.get("exitCode") in (protocol.ExitCode.OK, protocol.ExitCode.USER_EXCEPTION):
            # The runner published the result (a value or the function's exception)
            # before it exited: no need to wait for the Job controller to mark the Job.
            self._settle(index, None)
        if "running" in state or "terminated" in state:
            if index not in self._started and index < len(self.job.units):
                self._started.add(index)
                self.observer.started(self.job.units[index].items)
            if self._live or index in self._requested:
                self._start_following(name, index)

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "DELETED" or self._not_created_task is not None or self.pods:
            return
        message = str(obj.get("message", ""))
        self._not_created_task = asyncio.get_running_loop().create_task(self._not_created(message))

    async def _not_created(self, message: str) -> None:
        # The Job controller keeps retrying (quota may free up): wait out the grace period.
        await anyio.sleep(self.grace)
        if not self.pods:
            self._finish(
                WorkerFailed(
                    f"{self._where}: Kubernetes refused to create its pod: {message}. Fix: free "
                    "or raise the namespace's quota, or meet its admission policy (Pod Security)."
                )
            )

    async def _unschedulable(self, pod: str) -> None:
        # A cluster autoscaler may still add a node: wait out the grace period.
        await anyio.sleep(self.grace)
        obj = self.pods.get(pod, {})
        cond: dict[str, Any] = next(
            (
                c
                for c in obj.get("status", {}).get("conditions") or []
                if c.get("type") == "PodScheduled"
            ),
            {},
        )
        if cond.get("reason") == "Unschedulable":
            self._finish(
                Unschedulable(
                    f"{self._where}: no node can run pod {pod} "
                    f"({self.job.resources.gpu or 'no'} GPU, "
                    f"cpu={self.job.resources.cpu}, memory={self.job.resources.memory}, "
                    f"node_type={self.job.resources.node_type}). The scheduler says: "
                    f"{cond.get('message', '')}. Fix: ask for less, or for a node type the "
                    "cluster has."
                )
            )

    def _pod_running(self, name: str) -> bool:
        phase = self.pods.get(name, {}).get("status", {}).get("phase")
        return phase in (None, "Pending", "Running")

    def follow_item(self, item: int) -> None:
        """Stream the output of the pods running ``item`` (asked for by its logs)."""
        index = next((u.index for u in self.job.units if item in u.items), None)
        if index is None or index in self._settled or index in self._requested:
            return
        self._requested.add(index)
        for name, pod in self.pods.items():
            statuses = pod.get("status", {}).get("containerStatuses") or []
            if _index_of(pod) == index and any("running" in c.get("state", {}) for c in statuses):
                self._start_following(name, index)

    def _start_following(self, pod: str, index: int) -> None:
        if pod not in self._pod_logs:
            task = asyncio.get_running_loop().create_task(self._follow(pod, index))
            self._pod_logs[pod] = task

    async def _follow(self, pod: str, index: int) -> None:
        first_item = self.job.units[index].items.start if index < len(self.job.units) else 0
        on_line = ItemOutput(first_item, self.observer, self.tail).line

        async with self.ns.log_streams:
            await _logs.follow(
                self.ns.api, self.ns.namespace, pod, on_line, lambda: self._pod_running(pod)
            )


class KubernetesBackend:
    """Runs each call as a Kubernetes Job."""

    name = "kubernetes"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session = secrets.token_hex(4)  # labels this client process's Jobs
        self._namespaces: dict[tuple[Any, ...], _Namespace] = {}
        self._lock = anyio.Lock()

    async def _namespace(self, settings: Settings) -> _Namespace:
        namespace = settings.namespace or "default"
        key = (settings.kubeconfig, settings.context, namespace, settings.user)
        async with self._lock:
            if key not in self._namespaces:
                api = await Api.connect(settings)
                self._namespaces[key] = _Namespace(api, namespace, settings.user)
            return self._namespaces[key]

    async def run(self, job: Job, observer: JobObserver) -> None:
        ns = await self._namespace(job.settings)
        await ns.ensure_signing_secret(job)
        manifest = job_manifest(job, session=self._session)

        async def create(tracker: _Tracker) -> None:
            path = f"/apis/batch/v1/namespaces/{ns.namespace}/jobs"
            created = await ns.api.request("POST", path, body=manifest)
            tracker.uid = created["metadata"]["uid"]

        await self._follow(job, observer, ns, create)

    async def attach(self, job: Job, observer: JobObserver) -> None:
        """Follow a Job that another process created, from where it is now."""
        ns = await self._namespace(job.settings)
        await ns.jobs.wait_synced()
        await ns.pods.wait_synced()  # so the replay on subscribe covers its pods

        async def find(tracker: _Tracker) -> None:
            existing = ns.jobs.cached(job.job_id)
            if not existing:  # finished and cleaned up: the result, if any, is in storage
                tracker._finish()
                return
            tracker.uid = existing[0]["metadata"]["uid"]
            tracker.on_job("MODIFIED", existing[0])

        await self._follow(job, observer, ns, find)

    async def _follow(self, job: Job, observer: JobObserver, ns: _Namespace, start: Any) -> None:
        tracker = _Tracker(job, observer, ns, job.settings.unschedulable_grace)
        ns.jobs.subscribe(job.job_id, tracker.on_job)
        ns.pods.subscribe(job.job_id, tracker.on_pod)
        ns.events.subscribe(job.job_id, tracker.on_event)
        try:
            await start(tracker)
            await tracker.done.wait()
        except BaseException:
            if tracker.uid and not (job.settings.detach and observer.wanted(range(job.n_items))):
                with anyio.CancelScope(shield=True):
                    await self._delete(ns, job.job_id, tracker.uid)
            raise
        finally:
            for informer in (ns.jobs, ns.pods, ns.events):
                informer.unsubscribe(job.job_id)
        if tracker.errors:
            # Stop whatever is left (an unschedulable pod, an image that never comes).
            await self._delete(ns, job.job_id, tracker.uid)

    async def _delete(self, ns: _Namespace, name: str, uid: str | None) -> None:
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if uid:
            body["preconditions"] = {"uid": uid}
        started = time.monotonic()
        try:
            await ns.api.request(
                "DELETE", f"/apis/batch/v1/namespaces/{ns.namespace}/jobs/{name}", body=body
            )
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("deleting job failed", job=name, error=str(exc))
        log.debug("job deleted", job=name, seconds=time.monotonic() - started)
