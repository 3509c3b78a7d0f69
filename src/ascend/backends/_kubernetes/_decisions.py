"""What a Job's, a pod's or an event's state means for a call or a map item.

Pure functions of Kubernetes objects as the API returns them (JSON dicts; models from
kubernetes_asyncio go through :func:`plain` first), so every row of the "What you see"
table in docs/kubernetes.md is checked by unit tests over recorded objects, without a
cluster. The tracker in ``__init__`` keeps the state (which pods it saw, how long a pod
has been unschedulable) and acts on these verdicts; it decides nothing itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from ascend._errors import (
    AscendError,
    ImagePullError,
    Preempted,
    Unschedulable,
    WorkerFailed,
)
from ascend._resources import Resources
from ascend.backends import _diagnosis
from ascend_runner import protocol

IMAGE_ERRORS: Final = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
     "RegistryUnavailable"}
)  # fmt: skip
CONFIG_ERRORS: Final = frozenset({"CreateContainerConfigError", "CreateContainerError"})
INDEX_ANNOTATION: Final = "batch.kubernetes.io/job-completion-index"
# ErrImagePull can be a registry's passing hiccup: the kubelet retries it and then
# reports ImagePullBackOff. Only these fail a call at once.
_IMAGE_FINAL: Final = IMAGE_ERRORS - {"ErrImagePull"}
# A kubelet whose own watch of a Secret or ConfigMap has not caught up yet (a busy node)
# reports CreateContainerConfigError too, and retries: only a missing or wrong object
# (`secret "x" not found`) fails a call.
_CONFIG_TRANSIENT: Final = ("failed to sync secret cache", "failed to sync configmap cache")

PodKind = Literal["pending", "unschedulable", "running", "published", "failed", "disrupted"]


def plain(obj: Any) -> dict[str, Any]:
    """A Kubernetes object as the API's JSON: dicts pass through, models are converted."""
    if isinstance(obj, dict):
        return obj
    from kubernetes_asyncio.client import ApiClient

    converted = ApiClient().sanitize_for_serialization(obj)
    assert isinstance(converted, dict)
    return converted


@dataclass(frozen=True)
class Call:
    """What the decisions need to know about the call or map they decide for."""

    where: str
    """Names the call in messages: ``"train (job train-1f2e3d4c5b)"``."""
    resources: Resources = field(default_factory=Resources)
    startup_timeout: float | None = None
    """Seconds a pod may take from its creation until its container runs."""

    @classmethod
    def of(
        cls, name: str, job_id: str, resources: Resources, startup_timeout: float | None = None
    ) -> Call:
        return cls(f"{name} (job {job_id})", resources, startup_timeout)


@dataclass(frozen=True)
class PodState:
    """What one pod's status means.

    ``kind`` is one of:

    - ``pending``: not running yet, nothing wrong known;
    - ``unschedulable``: the scheduler found no node (``message`` is its explanation);
      the call waits ``unschedulable_grace`` before this becomes an error;
    - ``running``: the runner is running (or has started);
    - ``published``: the runner exited after publishing its result (a value or the
      function's exception), whatever the Job controller says later;
    - ``failed``: ``error`` says why no result will come from this pod;
    - ``disrupted``: the cluster took the pod away (``reason``, ``message``, ``node``);
      it says nothing about the user's code, so it does not count against ``retries``.
    """

    kind: PodKind
    error: AscendError | None = None
    stuck: bool = False
    """The pod cannot start (image, configuration): no later attempt will do better."""
    reason: str = ""
    message: str = ""
    node: str = ""


def true_condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The object's condition of type ``kind`` when its status is ``True``."""
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def pod_index(pod: dict[str, Any]) -> int:
    """The completion index of an Indexed Job's pod (0 for a single call's)."""
    annotations = pod.get("metadata", {}).get("annotations") or {}
    try:
        return int(annotations.get(INDEX_ANNOTATION, 0))
    except ValueError:
        return 0


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The runner container's ``terminated`` state, if it has ended."""
    for status in pod.get("status", {}).get("containerStatuses") or []:
        state = status.get("state", {}).get("terminated")
        if state:
            return dict(state)
    return None


def started(pod: dict[str, Any]) -> bool:
    """The runner container has run (it is running or has ended)."""
    return any(
        "running" in c.get("state", {}) or "terminated" in c.get("state", {})
        for c in pod.get("status", {}).get("containerStatuses") or []
    )


def runner_started(pod: dict[str, Any]) -> bool:
    """The runner has started: its container runs (or has ended) and, in a pod with a
    startup probe (the bootstrap's: it passes once the environment is unpacked), the
    probe has passed, i.e. the container status says ``started``."""
    for status in pod.get("status", {}).get("containerStatuses") or []:
        state = status.get("state", {})
        if "terminated" in state:
            return True
        if "running" in state:
            return status.get("started") is not False
    return False


def is_running(pod: dict[str, Any]) -> bool:
    """The pod may still produce output (pending or running, not being deleted)."""
    return pod.get("status", {}).get("phase") in (None, "Pending", "Running")


def disruption(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The pod's ``DisruptionTarget`` condition: preemption, eviction, drain, node loss."""
    return true_condition(pod, "DisruptionTarget")


_REFUSED = re.compile(r"\b(?:401|403)\b|unauthori[sz]ed|forbidden|denied", re.IGNORECASE)


def _pull_fix(pod: dict[str, Any], waiting: dict[str, Any]) -> str:
    """The way out of a failed pull: the credentials when the registry refused them."""
    if not _REFUSED.search(str(waiting.get("message", ""))):
        return "check that image=... / ASCEND_IMAGE names an image the cluster can pull"
    secrets = [s.get("name", "") for s in pod.get("spec", {}).get("imagePullSecrets") or []]
    if secrets:
        return (
            f"the registry refused the pull Secret {', '.join(secrets)} (registry_secret=...): "
            "check that its login may pull this repository"
        )
    return (
        "the registry wants credentials: set registry_secret=... to a "
        "kubernetes.io/dockerconfigjson Secret whose login may pull it (pods list it in "
        "imagePullSecrets)"
    )


def pod_state(pod: dict[str, Any], call: Call, logs: str = "") -> PodState:
    """What ``pod`` means for the call or item it runs; ``logs`` is its output's tail."""
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status", {})
    containers = status.get("containerStatuses") or []
    state = containers[0].get("state", {}) if containers else {}
    waiting = state.get("waiting") or {}
    ended = terminated(pod)
    if ended is not None and _diagnosis.published(int(ended.get("exitCode", -1))):
        return PodState("published")
    disrupted = disruption(pod)
    if disrupted is not None:
        return PodState(
            "disrupted",
            reason=str(disrupted.get("reason", "")),
            message=str(disrupted.get("message", "")),
            node=str(pod.get("spec", {}).get("nodeName") or ""),
        )
    if waiting.get("reason") in _IMAGE_FINAL:
        image = containers[0].get("image", "")
        return PodState(
            "failed",
            ImagePullError(
                f"{call.where}: pod {name} cannot pull image {image!r}: {waiting['reason']}: "
                f"{waiting.get('message', '')}. Fix: {_pull_fix(pod, waiting)}."
            ),
            stuck=True,
        )
    if waiting.get("reason") in CONFIG_ERRORS and not any(
        t in str(waiting.get("message", "")) for t in _CONFIG_TRANSIENT
    ):
        return PodState(
            "failed",
            WorkerFailed(
                f"{call.where}: pod {name} cannot start: {waiting.get('reason')}: "
                f"{waiting.get('message', '')}. Fix: create the Secret or ConfigMap it names "
                "(storage_secret=...), or correct the name."
            ),
            stuck=True,
        )
    if status.get("reason") == "DeadlineExceeded":
        return PodState("failed", pod_deadline_error(pod, call))
    if ended is not None:
        error = _diagnosis.exit_error(
            f"{call.where}: pod {name}",
            int(ended.get("exitCode", -1)),
            logs=logs,
            message=str(ended.get("message", "")) or _diagnosis.runner_reason(logs.splitlines()),
            oom=ended.get("reason") == "OOMKilled",
            memory=call.resources.memory,
            reason=str(ended.get("reason", "")),
            timeout=call.resources.timeout,
            startup_timeout=call.startup_timeout,
        )
        return PodState("failed", error)
    if state.get("running"):
        return PodState("running")
    scheduled: dict[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {}
    )
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return PodState("unschedulable", message=str(scheduled.get("message", "")))
    return PodState("pending")


def _timestamp(text: str | None) -> float | None:
    """Seconds since the epoch of an API timestamp (``2026-11-30T22:10:06Z``)."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def waiting_for(pod: dict[str, Any]) -> str:
    """What a pod that has not started is waiting for, in words: the scheduler's
    explanation, or its container's waiting reason and message (``ContainerCreating``
    while the image is pulled, ``ErrImagePull``, ...)."""
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status", {})
    node = pod.get("spec", {}).get("nodeName") or ""
    if not node:
        scheduled: dict[str, Any] = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {}
        )
        said = str(scheduled.get("message") or "").strip()
        if said:
            return f"pod {name} is not scheduled on any node yet; the scheduler says: {said}"
        return f"pod {name} is not scheduled on any node yet"
    containers = status.get("containerStatuses") or []
    waiting = (containers[0].get("state", {}).get("waiting") or {}) if containers else {}
    if waiting:
        reason = str(waiting.get("reason") or "waiting")
        said = str(waiting.get("message") or "").strip()
        what = f"pod {name} on node {node} is still {reason}"
        if reason == "ContainerCreating":
            image = containers[0].get("image") or ""
            what += f" (pulling image {image!r} or setting up the container)" if image else ""
        return f"{what}: {said}" if said else what
    if started(pod):
        return (
            f"pod {name} on node {node} runs its container, but the runner has not started: "
            "the bootstrap is still fetching and unpacking the environment"
        )
    return f"pod {name} on node {node} has not started its container yet"


def startup_deadline(pod: dict[str, Any], startup_timeout: float | None) -> float | None:
    """When (seconds since the epoch) a pod whose runner has not started runs out of
    ``startup_timeout``, counted from its creation; ``None`` when there is no such
    bound: no ``startup_timeout``, or the runner has started (:func:`runner_started`),
    or the pod ended."""
    if startup_timeout is None or runner_started(pod) or not is_running(pod):
        return None
    created = _timestamp(pod.get("metadata", {}).get("creationTimestamp"))
    if created is None:
        return None
    return created + startup_timeout


def startup_verdict(pod: dict[str, Any], call: Call, now: float) -> AscendError | None:
    """The ``StartupTimeout`` of a pod that has not started its container by ``now``
    (seconds since the epoch) although ``startup_timeout`` has passed since its creation,
    naming what it waits for; ``None`` while it is in time (or has started)."""
    deadline = startup_deadline(pod, call.startup_timeout)
    if deadline is None or now < deadline:
        return None
    return _diagnosis.startup_error(call.where, call.startup_timeout, waiting_for(pod))


def pod_deadline_error(pod: dict[str, Any], call: Call) -> AscendError:
    """A pod stopped by its ``activeDeadlineSeconds`` (``timeout + startup_timeout``).

    The runner stops the function itself at ``timeout`` and the client fails a pod that
    has not started within ``startup_timeout``, so this is the backstop: a container
    that never ran passed the startup bound (``StartupTimeout``); one that ran passed
    the run bound (``DeadlineExceeded``), with how long its start took."""
    if not runner_started(pod):
        return _diagnosis.startup_error(call.where, call.startup_timeout, waiting_for(pod))
    error = _diagnosis.deadline_error(call.where, call.resources.timeout)
    status = pod.get("status", {})
    began = _timestamp(status.get("startTime"))
    ran = next(
        (
            c.get("state", {}).get("running", {}).get("startedAt")
            or c.get("state", {}).get("terminated", {}).get("startedAt")
            for c in status.get("containerStatuses") or []
        ),
        None,
    )
    container = _timestamp(ran)
    if began is not None and container is not None and call.startup_timeout is not None:
        error.add_note(
            f"The pod's deadline is timeout + startup_timeout; its container started "
            f"{max(container - began, 0.0):g} s after the pod did (startup_timeout="
            f"{call.startup_timeout:g} s)."
        )
    return error


@dataclass(frozen=True)
class JobState:
    """What a Job's status says: indexes that succeeded or failed, and whether it ended.

    ``ended`` is ``"complete"`` (``Complete`` or ``SuccessCriteriaMet``), ``"failed"``
    (``FailureTarget`` or ``Failed``; ``condition`` is that condition) or ``None``.
    """

    completed: frozenset[int] = frozenset()
    failed: frozenset[int] = frozenset()
    ended: Literal["complete", "failed"] | None = None
    condition: dict[str, Any] = field(default_factory=dict)


def job_state(job: dict[str, Any]) -> JobState:
    status = job.get("status", {})
    completed = frozenset(protocol.parse_indexes(status.get("completedIndexes") or ""))
    failed = frozenset(protocol.parse_indexes(status.get("failedIndexes") or ""))
    if true_condition(job, "Complete") or true_condition(job, "SuccessCriteriaMet"):
        return JobState(completed, failed, "complete")
    failure = true_condition(job, "FailureTarget") or true_condition(job, "Failed")
    if failure is not None:
        return JobState(completed, failed, "failed", failure)
    return JobState(completed, failed)


def job_failure_error(
    condition: dict[str, Any], last_pod: dict[str, Any] | None, call: Call, logs: str = ""
) -> AscendError | None:
    """The error of a unit whose Job (or index) failed; ``last_pod`` is the unit's most
    recently ended pod, if one was seen. ``None``: the runner published the outcome."""
    reason = str(condition.get("reason", ""))
    if reason == "DeadlineExceeded":
        return _diagnosis.deadline_error(call.where, call.resources.timeout)
    if last_pod is not None:
        state = pod_state(last_pod, call, logs)
        if state.kind == "published":
            return None
        if state.kind == "failed":
            return state.error
    return WorkerFailed(
        f"{call.where}: Job failed ({reason}: {condition.get('message', '')}). Last output:\n"
        f"{logs}",
        logs=logs,
    )


def last_ended(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod among ``pods`` whose runner ended last."""
    ended = [(terminated(p) or {}).get("finishedAt", "") for p in pods]
    candidates = [(stamp, i) for i, stamp in enumerate(ended) if terminated(pods[i]) is not None]
    if not candidates:
        return None
    return pods[max(candidates)[1]]


def unschedulable_error(call: Call, pod: str, message: str) -> Unschedulable:
    r = call.resources
    return Unschedulable(
        f"{call.where}: no node can run pod {pod} ({r.describe_placement()}, cpu={r.cpu}, "
        f"memory={r.memory}). The scheduler says: {message}. Fix: ask for less, or for "
        "hardware the cluster has."
    )


def not_created_error(call: Call, message: str) -> WorkerFailed:
    """The Job's pod was never created (quota, admission): its ``FailedCreate`` event."""
    return WorkerFailed(
        f"{call.where}: Kubernetes refused to create its pod: {message}. Fix: free or raise "
        "the namespace's quota, or meet its admission policy (Pod Security)."
    )


def job_deleted_error(call: Call) -> WorkerFailed:
    return WorkerFailed(f"{call.where}: its Job was deleted before it finished.")


@dataclass(frozen=True)
class Disruption:
    """One pod the cluster took away."""

    pod: str
    reason: str
    message: str
    node: str

    def describe(self) -> str:
        where = f" on node {self.node}" if self.node else ""
        return f"pod {self.pod}{where}: {self.reason}: {self.message}".rstrip(": ")


def disruptions(pods: list[dict[str, Any]]) -> list[Disruption]:
    """The disrupted pods among ``pods`` (one unit's), oldest first."""
    out = []
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp", "")):
        state = pod_state(pod, Call("?"))
        if state.kind == "disrupted":
            out.append(Disruption(pod["metadata"]["name"], state.reason, state.message, state.node))
    return out


def preemption_verdict(seen: list[Disruption], call: Call) -> Literal["retry", "fail"]:
    """Run again (the Job controller replaces the pod) or give up, after ``seen``."""
    return "fail" if len(seen) > call.resources.max_preemptions else "retry"


def preempted_error(seen: list[Disruption], call: Call, *, job_gave_up: bool = False) -> Preempted:
    """The error once a unit was disrupted more than ``max_preemptions`` times, or
    (``job_gave_up``) once its Job failed because of a disruption it should have ignored:
    the pod's ``DisruptionTarget`` condition was lost before the Job controller saw it."""
    limit = call.resources.max_preemptions
    reasons = "; ".join(d.describe() for d in seen)
    times = f"{len(seen)} time{'s' if len(seen) != 1 else ''}"
    if job_gave_up:
        how = (
            f"{call.where} was taken off its node by the cluster ({times}, "
            f"max_preemptions={limit}) and its Job counted that as a failure (the pod's "
            "DisruptionTarget condition was gone when it ended)"
        )
    else:
        how = (
            f"{call.where} was taken off its node by the cluster {times} (max_preemptions={limit})"
        )
    return Preempted(
        f"{how}: {reasons}. Fix: raise max_preemptions=... (or retries=...), or run it on "
        "capacity that is not preemptible (node_type=... or a PriorityClass your cluster "
        "offers).",
        preemptions=len(seen),
        reasons=[d.reason for d in seen],
    )
