"""The Kubernetes backend: every call a Job, followed by shared watches.

Per namespace, one watch follows this user's Jobs, one their pods and one the Jobs'
``FailedCreate`` events, whatever the number of calls in flight. Before a Job that asks
for GPUs or a node type is created, its placement is checked against the cluster's
nodes (``_placement``). Each call's outcome is decided from watch events as soon as the
cause is known (``_decisions``: scheduler refusals, image pull errors, OOM kills,
deadlines, exit codes, disruptions), and its pod's output is streamed back live.
Cancelling deletes the Job (background propagation, UID precondition), which stops its
pod. :meth:`KubernetesBackend.aclose` closes the watches and the HTTP clients.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import functools
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
from anyio.abc import TaskGroup

from ascend._config import Settings
from ascend._errors import AscendError, ConfigError, PermissionDenied, Unschedulable
from ascend._logging import logger
from ascend.backends import ItemOutput, Job, JobObserver
from ascend.backends._kubernetes import _decisions, _logs, _placement
from ascend.backends._kubernetes._client import Api, ApiError
from ascend.backends._kubernetes._session import Session
from ascend.backends._kubernetes._spec import (
    LABEL_MANAGED,
    LABEL_USER,
    SIGNING_KEY_FIELD,
    job_manifest,
    signing_secret_name,
)
from ascend.backends._kubernetes._watch import Informer, involved_job

if TYPE_CHECKING:
    from ascend._environments import Environment, EnvironmentSpec
    from ascend._resources import Resources
    from ascend._storage import Storage

log = logger

_TAIL = 20
_MAX_LOG_STREAMS = 48
_LOG_DRAIN = 5.0
_DEFAULTS_FRESH = 300.0  # seconds an ascend-defaults ConfigMap read is reused
_LATE_POD_EVENTS = 2.0
_NODES_FRESH = 30.0  # seconds a node listing is reused by later pre-flights


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
        # The watches outlive every job: they belong to the backend, which stops them
        # in aclose().
        self._tasks = [
            asyncio.get_running_loop().create_task(i.run())
            for i in (self.jobs, self.pods, self.events)
        ]
        self._secrets: set[str] = set()
        self.defaults: dict[str, str] | None = None  # the ascend-defaults ConfigMap
        self.defaults_read = 0.0  # time.monotonic() of that read
        self._nodes: tuple[float, list[dict[str, Any]] | None] | None = None
        self._nodes_lock = anyio.Lock()
        self._nodes_denied_said = False

    async def nodes(self, *, fresh: bool = False) -> list[dict[str, Any]] | None:
        """The cluster's nodes (a listing of the last few seconds unless ``fresh``), or
        None when we may not list them (said once, as a warning)."""
        async with self._nodes_lock:
            recent = self._nodes is not None and time.monotonic() - self._nodes[0] < _NODES_FRESH
            if self._nodes is not None and recent and not (fresh and self._nodes[1] is not None):
                return self._nodes[1]
            try:
                listing = await self.api.request("GET", "/api/v1/nodes")
                nodes: list[dict[str, Any]] | None = list(listing.get("items") or [])
            except PermissionDenied as exc:
                if not self._nodes_denied_said:
                    self._nodes_denied_said = True
                    log.warning(
                        "cannot list nodes: placement is not checked before Jobs are created; "
                        "a request no node can run fails after unschedulable_grace instead",
                        error=str(exc),
                    )
                nodes = None
            except (ApiError, OSError, TimeoutError) as exc:
                # A passing API problem must not fail the call: skip the check this time.
                log.debug("listing nodes failed; placement not checked", error=repr(exc))
                return None
            self._nodes = (time.monotonic(), nodes)
            return nodes

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.api.close()

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


class _ItemOutput(ItemOutput):
    """A pod's output, cut per item, each item with its own tail; remembers when the
    pod last printed (see ``_logs.drained``)."""

    def __init__(
        self,
        first_item: int,
        observer: JobObserver,
        tails: dict[int, deque[str]],
        printed: Callable[[], None],
    ) -> None:
        super().__init__(first_item, observer, deque(maxlen=0))
        self._tails = tails
        self._printed = printed

    def feed(self, data: bytes) -> None:
        self._printed()
        super().feed(data)

    def _deliver(self, batches: list[tuple[int, list[str]]]) -> None:
        for item, lines in batches:
            if lines:
                tail = self._tails.get(item)
                if tail is None:
                    tail = self._tails[item] = deque(maxlen=_TAIL)
                tail.extend(lines[-_TAIL:])
                self._observer.log(item, lines)


class _Tracker:
    """Follows one Job from watch events and acts on what they mean.

    What an object's state means is decided in ``_decisions``; this class keeps what
    it saw (pods, disruptions, timers) and reports to the observer. Its tasks (log
    streams, grace timers, log drains) run in the job's task group, which ends with it.
    """

    def __init__(
        self,
        job: Job,
        observer: JobObserver,
        ns: _Namespace,
        grace: float,
        tg: TaskGroup,
    ) -> None:
        self.job = job
        self.observer = observer
        self.ns = ns
        self.grace = grace
        self.tg = tg
        self.done = anyio.Event()
        self.uid: str | None = None
        self.pods: dict[str, dict[str, Any]] = {}
        self.tails: dict[int, deque[str]] = {}
        self.call = _decisions.Call.of(
            job.name, job.job_id, job.resources, job.settings.startup_timeout
        )
        self._startup: dict[str, anyio.CancelScope] = {}  # pod -> its startup_timeout timer
        self.clock: Callable[[], float] = time.time  # wall clock, to compare with the API's
        self._not_created: anyio.CancelScope | None = None
        self._started: set[int] = set()
        self._settled: set[int] = set()
        self._pod_logs: dict[str, anyio.Event] = {}
        self._printed_at: dict[str, float] = {}  # pod -> when it last printed
        self._ever_scheduled = False
        self.errors: list[AscendError] = []
        self._notified = 0
        self._unschedulable: anyio.CancelScope | None = None
        # Per unit: the pods the cluster took away, by pod name (a pod's condition can be
        # overwritten later by whoever reports its end, so remember it when seen).
        self.disrupted: dict[int, dict[str, _decisions.Disruption]] = {}
        # A map's pods are not followed one stream each unless their output is to be
        # printed live: the connections would grow with the map. An item's output is
        # streamed when someone reads its logs while it runs, and read from the
        # runner's copies in storage once it has finished.
        self._live = not job.is_map or job.settings.stream_logs is True
        self._requested: set[int] = set()
        # Requests arrive in plain loop callbacks, outside any task: a task of the job's
        # group serves them (tasks can only be started from tasks).
        self._item_requests, self._item_requests_out = anyio.create_memory_object_stream[int](
            math.inf
        )
        tg.start_soon(self._serve_item_requests)
        self._stopping: set[str] = set()  # pods of cancelled items, being deleted
        if not self._live:
            observer.output_on_request(self.follow_item)

    async def _serve_item_requests(self) -> None:
        async for item in self._item_requests_out:
            self._follow_item(item)

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if not self.done.is_set():
            self.tg.start_soon(fn, *args)

    def _timer(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> anyio.CancelScope:
        """Run ``fn`` in the job's task group; the returned scope cancels it."""
        scope = anyio.CancelScope()

        async def run() -> None:
            with scope:
                await fn()

        self._spawn(run)
        return scope

    # -- cancelled map items -----------------------------------------------------------

    async def stop_cancelled(self) -> None:
        """Stop the pods of a map index whose items were all cancelled; the rest go on.

        A pod deleted this way fails its index (the runner exits ``TERMINATED``); a
        replacement the Job creates while retries remain is deleted as soon as it is
        seen (:meth:`_stop_if_unwanted` from :meth:`on_pod`), so the index is not run
        again.
        """
        starts = [u.items.start for u in self.job.units]
        while True:
            item = await self.observer.next_cancelled()
            index = bisect.bisect_right(starts, item) - 1
            for name, pod in list(self.pods.items()):
                if _decisions.pod_index(pod) == index:
                    self._stop_if_unwanted(name, pod, index)

    def _stop_if_unwanted(self, name: str, pod: dict[str, Any], index: int) -> None:
        if (
            not self.job.is_map
            or index >= len(self.job.units)
            or name in self._stopping
            or pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
            or self.observer.wanted(self.job.units[index].items)
        ):
            return
        self._stopping.add(name)
        self._spawn(self._delete_pod, name)

    async def _delete_pod(self, name: str) -> None:
        try:
            await self.ns.api.request(
                "DELETE", f"/api/v1/namespaces/{self.ns.namespace}/pods/{name}"
            )
        except ApiError as exc:
            if exc.status != 404:
                log.warning("stopping a cancelled item's pod failed", pod=name, error=str(exc))

    # -- outcome -----------------------------------------------------------------------

    def _finish(self, error: AscendError | None = None) -> None:
        """Settle every work unit that has no outcome yet."""
        for index in range(len(self.job.units)):
            self._settle(index, error)

    def _unit_pods(self, index: int) -> list[dict[str, Any]]:
        return [p for p in self.pods.values() if _decisions.pod_index(p) == index]

    def _logs(self, index: int) -> str:
        """The output tail of the unit's item that printed last (the one that failed)."""
        if index >= len(self.job.units):
            return ""
        for item in reversed(self.job.units[index].items):
            if self.tails.get(item):
                return "\n".join(self.tails[item])
        return ""

    def _settle(
        self, index: int, error: AscendError | Callable[[], AscendError | None] | None
    ) -> None:
        """One unit's outcome: its results are published, or ``error``. A callable error
        is decided once the unit's output has arrived, so its message carries the last
        lines (it may find that the runner published after all: ``None``)."""
        if index in self._settled or index >= len(self.job.units):
            return
        self._settled.add(index)
        items = self.job.units[index].items
        if not self._live and index not in self._requested:
            self.observer.output_copies(items, self._copies(index))
        # The outcome can be known before the last lines arrive (a failure too): let
        # them in first, so the call's logs end with its last line.
        waits = [
            name
            for name in self._pod_logs
            if _decisions.pod_index(self.pods.get(name, {})) == index
        ]
        if isinstance(error, AscendError) and not waits:
            self._report(items, error)
        else:
            self._spawn(self._settle_after, waits, items, error)

    def _report(self, items: range, error: AscendError | None) -> None:
        if error is None:
            self.observer.finished(items)
            self._notified += 1
        else:
            self.errors.append(error)
            self.observer.failed(items, error)
        self._check_done()

    async def _settle_after(
        self,
        pods: list[str],
        items: range,
        error: AscendError | Callable[[], AscendError | None] | None,
    ) -> None:
        await _logs.drained(
            {pod: self._pod_logs[pod] for pod in pods}, self._printed_at, quiet=_LOG_DRAIN
        )
        self._report(items, error() if callable(error) else error)

    def _check_done(self) -> None:
        if len(self._settled) == len(self.job.units) and self._notified + len(self.errors) >= len(
            self.job.units
        ):
            self.done.set()

    def on_job(self, kind: str, obj: dict[str, Any]) -> None:
        if self.uid and obj["metadata"].get("uid") != self.uid:
            return  # a same-named predecessor or successor
        if kind == "DELETED":
            self._finish(_decisions.job_deleted_error(self.call))
            return
        state = _decisions.job_state(obj)
        for index in state.completed:
            self._settle(index, None)
        for index in state.failed:
            # The Job and pod watches are not ordered: decide once the pod is seen.
            last = _decisions.last_ended(self._unit_pods(index))
            if last is not None:
                self._settle(
                    index,
                    functools.partial(self._failure, index, {"reason": "FailedIndexes"}, last),
                )
        if state.ended == "complete":
            self._finish()
        elif state.ended == "failed":
            for index in range(len(self.job.units)):
                last = _decisions.last_ended(self._unit_pods(index))
                if last is not None:
                    self._settle(
                        index, functools.partial(self._failure, index, state.condition, last)
                    )
            if len(self._settled) < len(self.job.units):
                self._spawn(self._settle_late, state.condition)

    async def _settle_late(self, failure: dict[str, Any]) -> None:
        """Give pod events that trail the Job's failure a moment, then settle the rest."""
        await anyio.sleep(_LATE_POD_EVENTS)
        for index in range(len(self.job.units)):
            last = _decisions.last_ended(self._unit_pods(index))
            self._settle(index, functools.partial(self._failure, index, failure, last))

    def _failure(
        self, index: int, condition: dict[str, Any], last: dict[str, Any] | None
    ) -> AscendError | None:
        seen = list(self.disrupted.get(index, {}).values())
        if (
            last is not None
            and last["metadata"]["name"] in self.disrupted.get(index, {})
            and condition.get("reason") != "DeadlineExceeded"
            and _decisions.pod_state(last, self.call).kind != "published"
        ):
            # The cluster took the last pod away, and the Job gave up on it anyway (its
            # DisruptionTarget condition was lost before the Job controller saw it).
            return _decisions.preempted_error(seen, self.call, job_gave_up=True)
        return _decisions.job_failure_error(condition, last, self.call, self._logs(index))

    def _copies(self, index: int) -> list[str]:
        """Where the runner stored each attempt's output for this index, oldest first."""
        started = sorted(
            (pod["metadata"].get("creationTimestamp", ""), name)
            for name, pod in self.pods.items()
            if _decisions.pod_index(pod) == index and _decisions.started(pod)
        )
        return [f"{self.job.paths.logs}/{name}.log" for _, name in started]

    def on_pod(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            timer = self._startup.pop(name, None)
            if timer is not None:  # gone before it started: its replacement has its own
                timer.cancel()
            return
        self.pods[name] = obj
        index = _decisions.pod_index(obj)
        if index is not None:
            self._stop_if_unwanted(name, obj, index)
        if obj.get("spec", {}).get("nodeName"):
            self._ever_scheduled = True
        state = _decisions.pod_state(obj, self.call, self._logs(index))
        self._watch_startup(name, obj, index)
        if state.kind != "unschedulable" and self._unschedulable is not None:
            self._unschedulable.cancel()
            self._unschedulable = None
        if state.stuck:
            # The pod cannot start (image, configuration): it never will.
            self._finish(state.error)
            return
        # Before its outcome is settled: the outcome waits for the output being followed.
        if _decisions.started(obj):
            # A disrupted pod is on its way out: the start to report is its replacement's.
            if (
                index not in self._started
                and index < len(self.job.units)
                and state.kind != "disrupted"
            ):
                self._started.add(index)
                self.observer.started(self.job.units[index].items)
            if self._live or index in self._requested:
                self._start_following(name, index)
        if state.kind == "disrupted":
            self._disrupted(index, name, state)
        elif state.kind == "unschedulable":
            # With pods running, the rest are just queued behind them.
            if self._unschedulable is None and not self._ever_scheduled:
                self._unschedulable = self._timer(lambda: self._unschedulable_after(name))
        elif state.kind == "published":
            # The runner published the result (a value or the function's exception)
            # before it exited: no need to wait for the Job controller to mark the Job.
            self._settle(index, None)

    def _watch_startup(self, name: str, pod: dict[str, Any], index: int) -> None:
        """Give a pod that has not started its container until ``startup_timeout`` after
        its creation; a pod that starts (or ends) in time stops its timer."""
        deadline = _decisions.startup_deadline(pod, self.call.startup_timeout)
        if deadline is None:
            timer = self._startup.pop(name, None)
            if timer is not None:
                timer.cancel()
            return
        if name in self._startup or index in self._settled:
            return
        # Counted from the pod's creation (the API server's clock), never longer than
        # startup_timeout from now: a client clock behind the server's cannot stretch it.
        assert self.call.startup_timeout is not None
        delay = min(max(deadline - self.clock(), 0.0), self.call.startup_timeout)
        self._startup[name] = self._timer(lambda: self._startup_after(name, index, delay))

    async def _startup_after(self, name: str, index: int, delay: float) -> None:
        await anyio.sleep(delay)
        self._startup.pop(name, None)
        pod = self.pods.get(name)
        # Past the deadline by construction; the pod's latest state decides.
        error = _decisions.startup_verdict(pod, self.call, math.inf) if pod else None
        if error is None or index in self._settled:
            return
        log.warning("pod did not start within startup_timeout", job=self.job.job_id, pod=name)
        self._settle(index, error)
        # A map's other items go on: stop this pod (and any replacement) now rather than
        # when the Job ends; a single call's Job is deleted once the call has failed.
        if pod is not None:
            self._stop_if_unwanted(name, pod, index)

    def _disrupted(self, index: int, pod: str, state: _decisions.PodState) -> None:
        seen = self.disrupted.setdefault(index, {})
        if pod in seen or index in self._settled or index >= len(self.job.units):
            return
        seen[pod] = _decisions.Disruption(pod, state.reason, state.message, state.node)
        disruptions = list(seen.values())
        items = self.job.units[index].items
        if _decisions.preemption_verdict(disruptions, self.call) == "fail":
            self._settle(index, _decisions.preempted_error(disruptions, self.call))
            return
        log.warning(
            "pod disrupted; running it again",
            job=self.job.job_id,
            pod=pod,
            reason=state.reason,
            preemptions=len(disruptions),
            max_preemptions=self.job.resources.max_preemptions,
        )
        self._started.discard(index)  # its replacement reports its own start
        if not self.job.is_map:
            # Its replacement may find no node (spot capacity gone): give it the same
            # grace as the first pod had, then say so.
            self._ever_scheduled = False
        report = getattr(self.observer, "preempted", None)
        if report is not None:
            report(items, len(disruptions), seen[pod].describe())

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "DELETED" or self._not_created is not None or self.pods:
            return
        message = str(obj.get("message", ""))
        self._not_created = self._timer(lambda: self._not_created_after(message))

    async def _not_created_after(self, message: str) -> None:
        # The Job controller keeps retrying (quota may free up): wait out the grace period.
        await anyio.sleep(self.grace)
        if not self.pods:
            self._finish(_decisions.not_created_error(self.call, message))

    async def _unschedulable_after(self, pod: str) -> None:
        # A cluster autoscaler may still add a node: wait out the grace period.
        await anyio.sleep(self.grace)
        state = _decisions.pod_state(self.pods.get(pod, {}), self.call)
        if state.kind == "unschedulable":
            self._finish(_decisions.unschedulable_error(self.call, pod, state.message))

    def _pod_running(self, name: str) -> bool:
        return _decisions.is_running(self.pods.get(name, {}))

    def follow_item(self, item: int) -> None:
        """Stream the output of the pods running ``item`` (asked for by its logs); may be
        called from a loop callback."""
        if not self.done.is_set():
            self._item_requests.send_nowait(item)

    def _follow_item(self, item: int) -> None:
        index = next((u.index for u in self.job.units if item in u.items), None)
        if index is None or index in self._settled or index in self._requested:
            return
        self._requested.add(index)
        for name, pod in self.pods.items():
            statuses = pod.get("status", {}).get("containerStatuses") or []
            if _decisions.pod_index(pod) == index and any(
                "running" in c.get("state", {}) for c in statuses
            ):
                self._start_following(name, index)

    def _start_following(self, pod: str, index: int) -> None:
        if pod not in self._pod_logs and not self.done.is_set():
            self._pod_logs[pod] = anyio.Event()
            self._spawn(self._follow, pod, index)

    async def _follow(self, pod: str, index: int) -> None:
        first_item = self.job.units[index].items.start if index < len(self.job.units) else 0
        output = _ItemOutput(
            first_item,
            self.observer,
            self.tails,
            lambda: self._printed_at.__setitem__(pod, time.monotonic()),
        )
        try:
            async with self.ns.log_streams:
                await _logs.follow(
                    self.ns.api, self.ns.namespace, pod, output, lambda: self._pod_running(pod)
                )
        except Exception as exc:  # output is best effort; the outcome never depends on it
            log.warning("following a pod's output failed", pod=pod, error=repr(exc))
        finally:
            self._pod_logs[pod].set()


class KubernetesBackend:
    """Runs each call as a Kubernetes Job."""

    name = "kubernetes"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session = secrets.token_hex(4)  # labels this client process's Jobs
        self._namespaces: dict[tuple[Any, ...], _Namespace] = {}
        self._sessions: dict[tuple[Any, ...], Session] = {}
        self._lock = anyio.Lock()

    async def _namespace(self, settings: Settings) -> _Namespace:
        namespace = settings.namespace or "default"
        key = (settings.kubeconfig, settings.context, namespace, settings.user)
        async with self._lock:
            if key not in self._namespaces:
                api = await Api.connect(settings)
                self._namespaces[key] = _Namespace(api, namespace, settings.user)
            return self._namespaces[key]

    async def aclose(self) -> None:
        """Stop the shared watches and close the API clients (at shutdown, once no job
        runs any more). The backend may be used again afterwards: it reconnects."""
        async with self._lock:
            namespaces = list(self._namespaces.values())
            self._namespaces.clear()
        for ns in namespaces:
            with contextlib.suppress(Exception):
                await ns.aclose()

    async def placement(self, job: Job, ns: _Namespace) -> _placement.Placement:
        """Where the job's pods may run; raises Unschedulable before any Job exists when
        no node of the cluster could ever run them."""
        request = _placement.request_of(job.resources, job.settings)
        nodes = await ns.nodes() if request.constrained and job.settings.preflight else None
        try:
            placement = _placement.plan(request, nodes)
        except Unschedulable:
            # Before refusing, make sure the listing is not a few seconds out of date
            # (a node just added or labelled).
            placement = _placement.plan(request, await ns.nodes(fresh=True))
        if placement.chosen:
            log.debug("placement", job=job.job_id, gpu=placement.chosen, checked=nodes is not None)
        return placement

    async def run(self, job: Job, observer: JobObserver) -> None:
        ns = await self._namespace(job.settings)
        placement = await self.placement(job, ns)
        await ns.ensure_signing_secret(job)
        manifest = job_manifest(job, session=self._session, placement=placement)
        if not job.settings.detach:  # owned by this client's Lease: reaped if it dies
            owner = await Session.of(
                self._sessions, ns.api, ns.namespace, job.settings, self._session
            )
            if owner is not None:
                manifest["metadata"]["ownerReferences"] = [owner]

        async def create(tracker: _Tracker) -> None:
            path = f"/apis/batch/v1/namespaces/{ns.namespace}/jobs"
            created = await ns.api.request("POST", path, body=manifest)
            tracker.uid = created["metadata"]["uid"]
            observer.submitted()  # a detached call is durable from here

        await self._follow(job, observer, ns, create)

    async def cluster_defaults(self, settings: Settings) -> dict[str, str]:
        """The namespace's ``ascend-defaults`` ConfigMap (the cluster's package index for
        environment builds); empty when there is none or it may not be read."""
        from ascend._environments import CLUSTER_DEFAULTS

        ns = await self._namespace(settings)
        # Read again after a while, and whenever there was none: one GET per call that
        # needs an environment, and a ConfigMap an admin adds takes effect at once.
        if ns.defaults is None or time.monotonic() - ns.defaults_read > _DEFAULTS_FRESH:
            path = f"/api/v1/namespaces/{ns.namespace}/configmaps/{CLUSTER_DEFAULTS}"
            try:
                found = await ns.api.request("GET", path)
            except (ApiError, PermissionDenied):  # none, or not readable: no defaults
                return {}
            except (OSError, TimeoutError, aiohttp.ClientError) as exc:
                raise ConfigError(
                    f"cannot reach the Kubernetes API server to read the cluster's package "
                    f"index ({CLUSTER_DEFAULTS} in {ns.namespace}): {exc!r}. Fix: check the "
                    "kubeconfig and context (network, VPN), or name the index yourself "
                    "(index_url=... / find_links=...), which needs no cluster."
                ) from exc
            ns.defaults = dict(found.get("data") or {})
            ns.defaults_read = time.monotonic()
        return ns.defaults

    async def cuda_driver_major(self, resources: Resources, settings: Settings) -> int | None:
        """The NVIDIA driver major version of the nodes a GPU call with ``resources``
        could run on (the lowest, from GPU Feature Discovery labels), or ``None``: no GPU
        asked for, nodes not readable, or one of the target nodes not labelled."""
        request = _placement.request_of(resources, settings)
        if not request.choices:
            return None
        ns = await self._namespace(settings)
        nodes = await ns.nodes()
        return None if nodes is None else _placement.driver_major_of_targets(request, nodes)

    async def ensure_image(
        self,
        settings: Settings,
        spec: EnvironmentSpec,
        storage: Storage,
        on_line: Callable[[str], None],
    ) -> str:
        """Find or build and push an environment image in the cluster (registry mode,
        see ``_envbuild``); returns ``host/repository@sha256:...``."""
        from ascend.backends._kubernetes._envbuild import ensure_image_in_cluster

        ns = await self._namespace(settings)
        return await ensure_image_in_cluster(ns.api, ns.namespace, settings, spec, storage, on_line)

    async def ensure_environment(
        self,
        settings: Settings,
        spec: EnvironmentSpec,
        storage: Storage,
        on_line: Callable[[str], None],
    ) -> Environment:
        """Find or build an environment in the cluster (see ``_envbuild``)."""
        from ascend.backends._kubernetes._envbuild import ensure_in_cluster

        ns = await self._namespace(settings)
        return await ensure_in_cluster(ns.api, ns.namespace, settings, spec, storage, on_line)

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

    async def _follow(
        self,
        job: Job,
        observer: JobObserver,
        ns: _Namespace,
        start: Callable[[_Tracker], Awaitable[None]],
    ) -> None:
        tracker: _Tracker | None = None
        try:
            async with anyio.create_task_group() as tg:
                tracker = _Tracker(job, observer, ns, job.settings.unschedulable_grace, tg)
                ns.jobs.subscribe(job.job_id, tracker.on_job)
                ns.pods.subscribe(job.job_id, tracker.on_pod)
                ns.events.subscribe(job.job_id, tracker.on_event)
                if job.is_map:
                    tg.start_soon(tracker.stop_cancelled)
                await start(tracker)
                await tracker.done.wait()
                # Whatever the job started and is still running (a log stream of a pod
                # being replaced, a grace timer) ends with it.
                tg.cancel_scope.cancel()
        except BaseException:
            if (
                tracker is not None
                and tracker.uid
                and not (job.settings.detach and observer.wanted(range(job.n_items)))
            ):
                with anyio.CancelScope(shield=True):
                    await self._delete(ns, job.job_id, tracker.uid)
            raise
        finally:
            for informer in (ns.jobs, ns.pods, ns.events):
                informer.unsubscribe(job.job_id)
        if tracker is not None and tracker.errors:
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
