"""The Kubernetes Job that runs a call (or, as an Indexed Job, a whole map)."""

from __future__ import annotations

import math
import re
import sys
from typing import Any, Final

from ascend._resources import memory_bytes
from ascend.backends import Job
from ascend.backends._kubernetes._placement import Placement, plan, request_of
from ascend_runner import protocol

LABEL_PREFIX: Final = "ascend.dev"
LABEL_MANAGED: Final = "app.kubernetes.io/managed-by"
LABEL_SESSION: Final = f"{LABEL_PREFIX}/session"
LABEL_USER: Final = f"{LABEL_PREFIX}/user"
LABEL_PROJECT: Final = f"{LABEL_PREFIX}/project"
LABEL_FUNCTION: Final = f"{LABEL_PREFIX}/function"
LABEL_JOB_ID: Final = f"{LABEL_PREFIX}/job-id"
ANNOTATION_FUNCTION: Final = f"{LABEL_PREFIX}/function"
ANNOTATION_STORAGE: Final = f"{LABEL_PREFIX}/storage"
CONTAINER: Final = "runner"
SIGNING_KEY_FIELD: Final = "signing-key"
RUNNER_UID: Final = 10001
TTL_AFTER_FINISHED: Final = 3600
# The pod's deadline is per attempt; the Job's covers every attempt plus scheduling slack.
_JOB_DEADLINE_SLACK: Final = 600


def default_image() -> str:
    """The name of a runner image for this client's Python version (what ``runner/Dockerfile``
    builds; ascend publishes none, and calls do not need one: without ``image`` a call
    runs on the stock base image through the bootstrap). The test cluster serves it."""
    return (
        f"ghcr.io/ascend-k8s/ascend-k8s-runner:0.1.0-py"
        f"{sys.version_info.major}.{sys.version_info.minor}"
    )


def label_value(text: str) -> str:
    """A valid label value (63 chars of ``[A-Za-z0-9._-]``, alphanumeric at both ends)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return cleaned.strip("._-") or "x"


def signing_secret_name(user: str, key: bytes) -> str:
    """One Secret per user *and* key, so a user whose key changed (a new machine) never
    has pods verify with a stale key."""
    import hashlib

    return f"ascend-signing-{user}-{hashlib.sha256(key).hexdigest()[:12]}"


def labels(job: Job, session: str) -> dict[str, str]:
    return {
        LABEL_MANAGED: "ascend",
        LABEL_SESSION: session,
        LABEL_USER: job.settings.user,
        LABEL_PROJECT: job.settings.project,
        LABEL_FUNCTION: label_value(job.name),
        LABEL_JOB_ID: job.job_id,
    }


def _resources(job: Job) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    r = job.resources
    if r.cpu is not None:
        requests["cpu"] = limits["cpu"] = r.cpu
    if r.memory is not None:
        memory_bytes(r.memory)  # validated already; a quantity the API accepts as is
        requests["memory"] = limits["memory"] = r.memory
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _env(job: Job) -> list[dict[str, Any]]:
    unit = job.units[0]
    runner_env = job.runner_env(unit)
    runner_env.pop(protocol.ENV_SIGNING_KEY)  # from a Secret, never a plain value
    runner_env[protocol.ENV_LOGS_URI] = job.paths.logs  # logs outlive the pod
    if job.is_map:
        runner_env.pop(protocol.ENV_INDEX)  # each pod gets JOB_COMPLETION_INDEX instead
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(runner_env.items())]
    env.append(
        {
            "name": protocol.ENV_SIGNING_KEY,
            "valueFrom": {
                "secretKeyRef": {
                    "name": signing_secret_name(job.settings.user, job.signing_key),
                    "key": SIGNING_KEY_FIELD,
                }
            },
        }
    )
    env.append(
        {"name": protocol.ENV_ATTEMPT, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    )
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
    env.extend({"name": k, "value": v} for k, v in sorted(job.resources.env.items()))
    return env


STARTED_FILE: Final = "/tmp/ascend-runner-started"  # noqa: S108 (the pod's own /tmp)
_PROBE_PERIOD: Final = 2


def startup_probe(startup_timeout: float) -> dict[str, Any]:
    """A startup probe that passes once the bootstrap has unpacked the environment and
    is starting the runner (it creates :data:`STARTED_FILE`), so the container's
    ``started`` in the pod status says when the runner starts, not only the bootstrap.
    The client fails a pod that has not started within ``startup_timeout``; the probe's
    own limit lies beyond that, so the kubelet never stops the container first."""
    check = f"import os; os.stat({STARTED_FILE!r})"
    return {
        "exec": {"command": ["python", "-S", "-c", check]},
        "periodSeconds": _PROBE_PERIOD,
        "timeoutSeconds": 10,
        "failureThreshold": math.ceil(startup_timeout / _PROBE_PERIOD) + 60,
    }


def pod_deadline(job: Job) -> int:
    """A pod's ``activeDeadlineSeconds``: its run budget (``timeout`` per item, times its
    items) plus ``startup_timeout`` (everything before the runner starts), whole seconds
    rounded up. Kubernetes counts it from the pod's start on a node, which includes the
    image pull and the environment fetch."""
    timeout = job.resources.timeout
    assert timeout is not None
    run = timeout * max(len(u.items) for u in job.units)
    return max(math.ceil(run + job.settings.startup_timeout), 1)


def job_manifest(
    job: Job, *, session: str, image: str | None = None, placement: Placement | None = None
) -> dict[str, Any]:
    """The ``batch/v1`` Job for ``job``, as the API's JSON.

    - resources from the decorator: ``cpu``/``memory`` as requests and limits;
    - where it runs from ``placement`` (see ``_placement``; planned without the node list
      when not given): ``nvidia.com/gpu`` limits with the matching toleration, GPU model
      and memory as node affinity on GPU Feature Discovery labels, ``node_type`` as a
      node selector (on ``node.kubernetes.io/instance-type``, or a named node type's);
    - ``timeout + startup_timeout`` as the pod's ``activeDeadlineSeconds`` (per
      attempt; :func:`pod_deadline`): a backstop, since the runner stops the function
      once it has run ``timeout`` from its own start and the client fails a pod that has
      not started within ``startup_timeout``, so a slow start never eats the run budget;
    - ``retries`` as ``backoffLimit`` (per index for a map), with a pod failure policy that
      fails at once on the runner's reserved exit codes (user exceptions included) and
      does not count disruptions (preemption, eviction, drain: the client counts those
      against ``max_preemptions``), and ``podReplacementPolicy: Failed`` so a replacement
      pod starts only once the one it replaces has stopped and freed its GPUs;
    - a restricted Pod Security profile: non-root, no privilege escalation, no
      capabilities, ``RuntimeDefault`` seccomp;
    - ``registry_secret``, when set, as the pod's ``imagePullSecrets``.
    """
    r = job.resources
    meta_labels = labels(job, session)
    image = image or r.image or job.settings.image or default_image()
    command = ["python", "-u", "-m", "ascend_runner"]
    started_probe: dict[str, Any] | None = None
    if job.environment is not None and job.environment.image:
        image = job.environment.image  # registry mode: the environment is in the image
    elif job.environment is not None:
        # A stock base image: the bootstrap fetches the environment, then runs the runner.
        from ascend import _environments

        image = _environments.image_ref(job.environment.spec)
        command = _environments.bootstrap_command()
        started_probe = startup_probe(job.settings.startup_timeout)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": _env(job),
        "resources": _resources(job),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": False,
        },
    }
    if started_probe is not None:
        container["startupProbe"] = started_probe
        container["env"].insert(0, {"name": protocol.ENV_STARTED_FILE, "value": STARTED_FILE})
    if job.settings.storage_secret:
        container["envFrom"] = [{"secretRef": {"name": job.settings.storage_secret}}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # The runner stops on SIGTERM at once (exit TERMINATED); a short grace period
        # frees a cancelled call's GPU node soon even when the function ignores it.
        "terminationGracePeriodSeconds": math.ceil(job.settings.termination_grace),
        "containers": [container],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,
            "runAsGroup": RUNNER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    if job.settings.registry_secret:  # the registry's pull credentials (environment images)
        pod_spec["imagePullSecrets"] = [{"name": job.settings.registry_secret}]
    if r.timeout is not None:
        pod_spec["activeDeadlineSeconds"] = pod_deadline(job)
    if placement is None:
        placement = plan(request_of(r, job.settings), None)
    placement.apply(pod_spec, container)
    meta_labels.update(placement.labels)
    failure_action = "FailIndex" if job.is_map else "FailJob"
    spec: dict[str, Any] = {
        "ttlSecondsAfterFinished": TTL_AFTER_FINISHED,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            # The first matching rule applies: a disrupted pod is never held against
            # the call, whatever its runner exited with when it was stopped.
            "rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {
                    "action": failure_action,
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": protocol.ExitCode.reserved(),
                    },
                },
            ]
        },
        "template": {"metadata": {"labels": meta_labels}, "spec": pod_spec},
    }
    if r.timeout is not None:
        attempts = r.retries + 1
        spec["activeDeadlineSeconds"] = (
            pod_spec["activeDeadlineSeconds"] * attempts * len(job.units) + _JOB_DEADLINE_SLACK
        )
    if job.is_map:
        spec.update(
            completionMode="Indexed",
            completions=len(job.units),
            parallelism=min(len(job.units), job.max_parallel or len(job.units)),
            backoffLimitPerIndex=r.retries,
            maxFailedIndexes=len(job.units),
        )
    else:
        spec["backoffLimit"] = r.retries
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job.job_id,
            "labels": meta_labels,
            "annotations": {
                ANNOTATION_FUNCTION: job.name,
                ANNOTATION_STORAGE: job.paths.root,
            },
        },
        "spec": spec,
    }
