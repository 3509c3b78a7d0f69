"""Every row of docs/kubernetes.md's "What you see" table, decided from the objects the
test cluster produced for it (tests/unit/fixtures/k8s, recorded by ``record.py``)."""

from __future__ import annotations

import copy
import json
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import ascend
from ascend._resources import Resources
from ascend.backends._kubernetes import _decisions as d
from ascend.backends._kubernetes import _ItemOutput
from ascend.backends._kubernetes._client import _error
from ascend_runner import framing, protocol

FIXTURES = Path(__file__).parent / "fixtures" / "k8s"
Obj = dict[str, Any]


class Recording:
    """The versions of one scenario's objects, in the order the watches saw them."""

    def __init__(self, name: str) -> None:
        data = json.loads((FIXTURES / f"{name}.json").read_text())
        # The scenario's own job is the one created last in the recording.
        jobs = data["jobs"]
        self.job_id = max(jobs, key=lambda j: j["metadata"]["creationTimestamp"])["metadata"][
            "name"
        ] if jobs else ""  # fmt: skip
        self.jobs: list[Obj] = [j for j in jobs if j["metadata"]["name"] == self.job_id]
        self.pods: list[Obj] = [
            p for p in data["pods"]
            if (p["metadata"].get("labels") or {}).get("ascend.dev/job-id") == self.job_id
        ]  # fmt: skip
        self.events: list[Obj] = data["events"]

    def pod(self, where: Callable[[Obj], bool] = lambda _: True) -> Obj:
        """The latest recorded version of a pod that satisfies ``where``."""
        return copy.deepcopy(next(p for p in reversed(self.pods) if where(p)))

    def latest_pods(self, index: int | None = None) -> list[Obj]:
        latest: dict[str, Obj] = {}
        for pod in self.pods:
            if index is None or d.pod_index(pod) == index:
                latest[pod["metadata"]["name"]] = pod
        return list(latest.values())

    def job(self) -> Obj:
        return copy.deepcopy(self.jobs[-1])


def call(**options: Any) -> d.Call:
    return d.Call("f (job f-0123456789)", Resources.build(**options))


def test_a_function_that_returned_is_published_and_its_job_complete() -> None:
    rec = Recording("succeeded")
    assert d.pod_state(rec.pod(), call()).kind == "published"
    assert d.job_state(rec.job()).ended == "complete"


def test_a_function_that_raised_is_published_though_its_job_failed() -> None:
    rec = Recording("user_exception")
    pod = rec.pod(lambda p: d.terminated(p) is not None)
    assert d.terminated(pod)["exitCode"] == protocol.ExitCode.USER_EXCEPTION  # type: ignore[index]
    assert d.pod_state(pod, call()).kind == "published"
    job = d.job_state(rec.job())
    assert job.ended == "failed"
    assert d.job_failure_error(job.condition, pod, call()) is None


def test_an_unschedulable_pod_waits_then_names_the_schedulers_message() -> None:
    rec = Recording("unschedulable")
    state = d.pod_state(rec.pod(), call(cpu=64))
    assert state.kind == "unschedulable"
    assert "Insufficient cpu" in state.message
    error = d.unschedulable_error(call(cpu=64), rec.pod()["metadata"]["name"], state.message)
    assert isinstance(error, ascend.Unschedulable)
    assert "cpu=64" in str(error) and "Insufficient cpu" in str(error)


def test_an_image_pull_back_off_is_an_image_pull_error_at_once() -> None:
    rec = Recording("image_pull")
    state = d.pod_state(rec.pod(), call())
    assert state.stuck and isinstance(state.error, ascend.ImagePullError)
    assert "registry.invalid/none:1" in str(state.error)


@pytest.mark.parametrize("secrets", [[], [{"name": "registry-push"}]])
def test_a_pull_the_registry_refuses_names_the_credentials(secrets: list[dict[str, str]]) -> None:
    pod = Recording("image_pull").pod()
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    waiting["message"] = (
        'Back-off pulling image "reg:5000/envs@sha256:c1": failed to resolve reference: '
        "pulling from host reg:5000 failed with status code [manifests sha256:c1]: "
        "401 Unauthorized"
    )
    pod["spec"]["imagePullSecrets"] = secrets
    error = d.pod_state(pod, call()).error
    assert isinstance(error, ascend.ImagePullError)
    assert "registry_secret" in str(error) and "image=... / ASCEND_IMAGE" not in str(error)
    if secrets:
        assert "refused the pull Secret registry-push" in str(error)


def test_a_first_err_image_pull_is_not_yet_final() -> None:
    pod = Recording("image_pull").pod()
    pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] = "ErrImagePull"
    assert d.pod_state(pod, call()).kind == "pending"


def test_an_oom_killed_container_is_oom_killed_naming_the_limit() -> None:
    rec = Recording("oom_killed")
    job = d.job_state(rec.job())
    last = d.last_ended(rec.latest_pods())
    error = d.job_failure_error(job.condition, last, call(memory="150Mi"), "line")
    assert isinstance(error, ascend.OOMKilled)
    assert "150Mi" in str(error) and error.logs == "line"


def test_a_pod_past_its_deadline_is_deadline_exceeded() -> None:
    rec = Recording("deadline")
    pod = rec.pod(lambda p: p["status"].get("reason") == "DeadlineExceeded")
    state = d.pod_state(pod, call(timeout=2))
    assert isinstance(state.error, ascend.DeadlineExceeded)
    assert "timeout of 2 s" in str(state.error)
    error = d.job_failure_error(d.job_state(rec.job()).condition, pod, call(timeout=2))
    assert isinstance(error, ascend.DeadlineExceeded)


def test_a_job_past_its_own_deadline_is_deadline_exceeded() -> None:
    condition = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}
    assert isinstance(
        d.job_failure_error(condition, None, call(timeout=5)), ascend.DeadlineExceeded
    )


def test_any_other_exit_is_worker_failed_with_code_and_output() -> None:
    rec = Recording("exit_code")
    last = d.last_ended(rec.latest_pods())
    error = d.job_failure_error(d.job_state(rec.job()).condition, last, call(), "crashing now")
    assert isinstance(error, ascend.WorkerFailed) and not isinstance(error, ascend.OOMKilled)
    assert error.exit_code == 3 and "crashing now" in str(error)


def test_a_reserved_exit_code_names_the_runners_reason() -> None:
    pod = d.last_ended(Recording("exit_code").latest_pods())
    assert pod is not None
    ended = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    ended.update(exitCode=protocol.ExitCode.VERSION_MISMATCH, message="made by Python 3.12")
    error = d.pod_state(pod, call()).error
    assert isinstance(error, ascend.VersionMismatch) and "Python 3.12" in str(error)
    ended.update(exitCode=protocol.ExitCode.RESULT_UNWRITABLE, message="bucket gone")
    error = d.pod_state(pod, call()).error
    assert isinstance(error, ascend.WorkerFailed)
    assert error.exit_code == 84 and "result unwritable" in str(error)


def test_rbac_refusal_is_permission_denied_naming_what_is_needed() -> None:
    body = json.dumps({"message": 'jobs.batch is forbidden: User "bob"'}).encode()
    error = _error(403, body, "POST", "/apis/batch/v1/namespaces/x/jobs")
    assert isinstance(error, ascend.PermissionDenied) and "Role" in str(error)


def test_a_pod_never_created_reports_the_jobs_event() -> None:
    rec = Recording("never_created")
    event = next(e for e in rec.events if e.get("reason") == "FailedCreate")
    error = d.not_created_error(call(), event["message"])
    assert "exceeded quota" in str(error) and "quota" in str(error)


def test_a_pod_that_cannot_start_for_its_configuration_fails_at_once() -> None:
    state = d.pod_state(Recording("config_error").pod(), call())
    assert state.stuck and isinstance(state.error, ascend.WorkerFailed)
    assert "no-such-secret" in str(state.error)


@pytest.mark.parametrize("kind", ["secret", "configmap"])
def test_a_kubelet_that_has_not_synced_a_secret_yet_leaves_the_pod_pending(kind: str) -> None:
    """What a busy real kubelet reports before it retries; not the call's fault."""
    pod = Recording("config_error").pod()
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    waiting["message"] = f"failed to sync {kind} cache: timed out waiting for the condition"
    state = d.pod_state(pod, call())
    assert (state.kind, state.error, state.stuck) == ("pending", None, False)


def test_an_evicted_pod_is_disrupted_not_failed() -> None:
    rec = Recording("evicted_once")
    pod = rec.pod(lambda p: d.disruption(p) is not None)
    state = d.pod_state(pod, call())
    assert (state.kind, state.reason) == ("disrupted", "EvictionByEvictionAPI")
    assert state.node == "cpu-1"


def test_disruptions_are_retried_up_to_max_preemptions_then_preempted() -> None:
    rec = Recording("evicted_once")
    seen = d.disruptions([rec.pod(lambda p: d.disruption(p) is not None)])
    assert len(seen) == 1
    assert d.preemption_verdict(seen, call(max_preemptions=1)) == "retry"
    assert d.preemption_verdict(seen, call(max_preemptions=0)) == "fail"
    error = d.preempted_error(seen, call(max_preemptions=0))
    assert isinstance(error, ascend.Preempted) and isinstance(error, ascend.WorkerFailed)
    assert error.preemptions == 1 and error.reasons == ["EvictionByEvictionAPI"]
    assert "1 time (max_preemptions=0)" in str(error) and "EvictionByEvictionAPI" in str(error)


def test_a_pod_preempted_by_the_scheduler_is_disrupted_naming_why() -> None:
    rec = Recording("preempted_by_scheduler")
    pod = rec.pod(lambda p: d.disruption(p) is not None)
    state = d.pod_state(pod, call(gpu=2))
    assert (state.kind, state.reason, state.node) == ("disrupted", "PreemptionByScheduler", "gpu-1")
    error = d.preempted_error(d.disruptions([pod]), call(gpu=2, max_preemptions=0))
    assert "PreemptionByScheduler" in str(error) and "on node gpu-1" in str(error)


def test_a_pod_that_published_before_its_eviction_counts_as_published() -> None:
    pod = Recording("evicted_once").pod(lambda p: d.disruption(p) is not None)
    pod["status"]["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 0}}
    assert d.pod_state(pod, call()).kind == "published"


def test_a_job_that_succeeded_without_a_result_is_complete() -> None:
    # ResultMissing is the scheduler's finding (no result in storage); the backend only
    # reports the Job complete.
    assert d.job_state(Recording("succeeded").job()).ended == "complete"


def test_a_maps_failed_item_is_its_own_index_with_its_own_pod() -> None:
    rec = Recording("map_one_item_fails")
    job = d.job_state(rec.job())
    assert job.failed == {1} and job.completed <= {0, 2}
    # Item 2 is known from its pod's exit before the Job's status says so.
    assert [d.pod_state(p, call()).kind for p in rec.latest_pods(index=2)] == ["published"]
    failed = d.last_ended(rec.latest_pods(index=1))
    error = d.job_failure_error({"reason": "FailedIndexes"}, failed, call(), "item 1 crash")
    assert isinstance(error, ascend.WorkerFailed) and error.exit_code == 3
    assert all(d.pod_state(p, call()).kind == "published" for p in rec.latest_pods(index=0))


class _Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def log(self, item: int, lines: list[str]) -> None:
        self.lines.extend((item, line) for line in lines)


def test_each_map_item_keeps_its_own_output_tail() -> None:
    tails: dict[int, deque[str]] = {}
    observer = _Lines()
    printed: list[bool] = []
    output = _ItemOutput(4, observer, tails, lambda: printed.append(True))  # type: ignore[arg-type]
    output.feed(b"a\n" + framing.item_marker(5) + b"b\nc")
    output.end()
    assert {k: list(v) for k, v in tails.items()} == {4: ["a"], 5: ["b", "c"]}
    assert observer.lines == [(4, "a"), (5, "b"), (5, "c")]
    assert printed


@pytest.mark.parametrize("name", ["succeeded", "exit_code", "oom_killed", "deadline", "slow_pull"])
def test_recordings_hold_the_scenarios_own_objects(name: str) -> None:
    rec = Recording(name)
    assert rec.jobs and rec.pods


# -- startup_timeout: everything before the container runs, apart from timeout --------


def _created(pod: Obj) -> float:
    stamp = pod["metadata"]["creationTimestamp"].replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def _pulling() -> Obj:
    """A scheduled pod whose kubelet is pulling its image, as recorded: the suite's nodes
    hold their images, so the recording pulls a fresh layer through a throttled path to
    the registry (``tests/cluster/slowpull.py``); meanwhile the kubelet reports the
    container as ``waiting: {reason: ContainerCreating}``."""
    return Recording("slow_pull").pod(
        lambda p: (
            not p["metadata"].get("deletionTimestamp")
            and (p["status"].get("containerStatuses") or [{}])[0].get("state", {}).get("waiting")
            == {"reason": "ContainerCreating"}
        )
    )


def startup(seconds: float, **options: Any) -> d.Call:
    return d.Call("f (job f-0123456789)", Resources.build(**options), seconds)


def test_an_unscheduled_pod_past_startup_timeout_is_a_startup_timeout_naming_the_scheduler() -> (
    None
):
    rec = Recording("unschedulable")
    pod = rec.pod()
    error = d.startup_verdict(pod, startup(5), _created(pod) + 5)
    assert isinstance(error, ascend.StartupTimeout)
    assert "startup_timeout=5 s" in str(error)
    assert "not scheduled" in str(error) and "Insufficient cpu" in str(error)


def test_a_pod_within_startup_timeout_has_no_verdict_yet() -> None:
    rec = Recording("unschedulable")
    pod = rec.pod()
    assert d.startup_verdict(pod, startup(5), _created(pod) + 4.9) is None


def test_a_pod_whose_container_runs_has_no_startup_deadline() -> None:
    rec = Recording("succeeded")
    running = rec.pod(lambda p: p["status"].get("phase") == "Running")
    ended = rec.pod()
    assert d.startup_deadline(running, 5) is None
    assert d.startup_deadline(ended, 5) is None
    assert d.startup_verdict(running, startup(5), _created(running) + 3600) is None


def test_a_pod_without_startup_timeout_has_no_startup_deadline() -> None:
    pod = Recording("unschedulable").pod()
    assert d.startup_deadline(pod, None) is None


def test_the_startup_deadline_counts_from_the_pods_creation() -> None:
    pod = Recording("unschedulable").pod()
    assert d.startup_deadline(pod, 7) == _created(pod) + 7


def test_a_pod_still_pulling_its_image_is_a_startup_timeout_naming_the_image() -> None:
    pod = _pulling()
    image = pod["spec"]["containers"][0]["image"]
    assert d.pod_state(pod, startup(5)).kind == "pending"
    assert d.startup_verdict(pod, startup(5), _created(pod) + 4.9) is None
    error = d.startup_verdict(pod, startup(5), _created(pod) + 5)
    assert isinstance(error, ascend.StartupTimeout)
    assert f"is still ContainerCreating (pulling image {image!r}" in str(error)
    assert f"on node {pod['spec']['nodeName']}" in str(error)
    assert "timeout was not touched" in str(error)


def test_a_pod_retrying_an_image_pull_past_startup_timeout_names_the_pull_error() -> None:
    rec = Recording("image_pull")
    pod = rec.pod(
        lambda p: any(
            (c.get("state", {}).get("waiting") or {}).get("reason") == "ErrImagePull"
            for c in p["status"].get("containerStatuses") or []
        )
    )
    assert d.pod_state(pod, call()).kind == "pending"  # a passing pull error: not stuck
    error = d.startup_verdict(pod, startup(30), _created(pod) + 30)
    assert isinstance(error, ascend.StartupTimeout)
    assert "ErrImagePull" in str(error) and "registry.invalid/none:1" in str(error)


def test_a_scheduled_pod_with_no_container_status_yet_says_so() -> None:
    rec = Recording("succeeded")
    pod = rec.pod(lambda p: bool(p["spec"].get("nodeName")) and not d.started(p))
    pod["status"].pop("containerStatuses", None)
    assert "has not started its container yet" in d.waiting_for(pod)


def test_a_pod_deadline_after_its_container_ran_is_deadline_exceeded_naming_its_start() -> None:
    rec = Recording("deadline")
    pod = rec.pod(lambda p: p["status"].get("reason") == "DeadlineExceeded")
    state = d.pod_state(pod, startup(900, timeout=2))
    assert isinstance(state.error, ascend.DeadlineExceeded)
    assert "timeout of 2 s" in str(state.error)
    notes = "\n".join(getattr(state.error, "__notes__", []))
    assert "timeout + startup_timeout" in notes and "started 0 s after the pod" in notes


def test_a_pod_deadline_before_its_container_ran_is_a_startup_timeout() -> None:
    pod = _pulling()
    pod["status"].update(phase="Failed", reason="DeadlineExceeded")
    state = d.pod_state(pod, startup(60, timeout=2))
    assert isinstance(state.error, ascend.StartupTimeout)
    assert "ContainerCreating" in str(state.error)


def _exited(code: int, logs_line: str) -> tuple[Obj, str]:
    rec = Recording("exit_code")
    pod = rec.pod(lambda p: d.terminated(p) is not None)
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] = code
    pod["status"]["containerStatuses"][0]["state"]["terminated"].pop("message", None)
    return pod, protocol.DIAGNOSTIC_PREFIX + logs_line


def test_a_runner_that_stopped_its_function_at_timeout_is_deadline_exceeded_from_its_start() -> (
    None
):
    pod, logs = _exited(protocol.ExitCode.DEADLINE, "the function ran past its timeout of 2 s")
    state = d.pod_state(pod, startup(900, timeout=2), logs)
    assert isinstance(state.error, ascend.DeadlineExceeded)
    assert "timeout of 2 s per call (counted from the runner's start)" in str(state.error)


def test_a_bootstrap_that_gave_up_fetching_is_a_startup_timeout_naming_the_fetch() -> None:
    pod, logs = _exited(
        protocol.ExitCode.STARTUP_TIMEOUT,
        "startup timeout: still fetching and unpacking the environment http://s/e.tar.gz "
        "after 30 s",
    )
    state = d.pod_state(pod, startup(30), logs)
    assert isinstance(state.error, ascend.StartupTimeout)
    assert "startup_timeout=30 s" in str(state.error)
    assert "still fetching and unpacking the environment http://s/e.tar.gz" in str(state.error)


def test_a_run_past_its_timeout_is_retried_as_before_and_a_startup_timeout_is_not() -> None:
    # retries covers crashes, lost nodes and timeouts; a start that did not come in time
    # is not the function's doing, and fails like an image that cannot be pulled.
    assert protocol.ExitCode.DEADLINE not in protocol.ExitCode.reserved()
    assert protocol.ExitCode.STARTUP_TIMEOUT in protocol.ExitCode.reserved()


def test_a_recorded_runner_stopped_at_its_timeout_is_deadline_exceeded() -> None:
    rec = Recording("run_timeout")
    last = d.last_ended(rec.latest_pods())
    assert last is not None
    assert d.terminated(last)["exitCode"] == protocol.ExitCode.DEADLINE  # type: ignore[index]
    assert last["spec"]["activeDeadlineSeconds"] == 902  # timeout + startup_timeout
    logs = protocol.DIAGNOSTIC_PREFIX + "the function ran past its timeout of 2 s"
    error = d.job_failure_error(
        d.job_state(rec.job()).condition, last, startup(900, timeout=2), logs
    )
    assert isinstance(error, ascend.DeadlineExceeded)
    assert "counted from the runner's start" in str(error)


def test_a_recorded_pod_that_never_started_is_past_its_startup_deadline() -> None:
    rec = Recording("startup_timeout")
    pod = rec.pod(lambda p: not d.started(p) and d.is_running(p))
    error = d.startup_verdict(pod, startup(3, cpu=64), _created(pod) + 3)
    assert isinstance(error, ascend.StartupTimeout)
    assert "Insufficient cpu" in str(error)


def test_a_running_bootstrap_whose_startup_probe_has_not_passed_has_not_started() -> None:
    """A kubelet reports a container with a startup probe as ``started: false`` until the
    probe passes (derived from the recorded running pod, whose call had no probe)."""
    rec = Recording("succeeded")
    pod = rec.pod(lambda p: p["status"].get("phase") == "Running")
    assert d.runner_started(pod)
    pod["status"]["containerStatuses"][0]["started"] = False
    assert d.started(pod) and not d.runner_started(pod)
    error = d.startup_verdict(pod, startup(60), _created(pod) + 60)
    assert isinstance(error, ascend.StartupTimeout)
    assert "the bootstrap is still fetching and unpacking the environment" in str(error)
    pod["status"]["containerStatuses"][0]["started"] = True
    assert d.startup_deadline(pod, 60) is None
