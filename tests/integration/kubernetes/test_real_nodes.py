"""What only a real kubelet shows: users, the restricted profile, termination, images."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import ascend
from tests.cluster.fixtures_k8s import K8sCluster, wait_until
from tests.cluster.k8s_helpers import pods_of as _pods

pytestmark = [pytest.mark.k8s, pytest.mark.usefixtures("clean_jobs")]


@ascend.remote
def identity() -> dict[str, Any]:
    import os
    from pathlib import Path

    lines = Path("/proc/self/status").read_text().splitlines()
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "pid": os.getpid(),
        "seccomp": status["Seccomp"].strip(),
        "no_new_privs": status["NoNewPrivs"].strip(),
        "effective_caps": status["CapEff"].strip(),
    }


@ascend.remote
def sleeper(seconds: float) -> str:
    print("sleeping", flush=True)
    time.sleep(seconds)
    return "woke"


def test_a_calls_pod_runs_as_uid_10001_with_the_restricted_profile(on_cluster: K8sCluster) -> None:
    seen = identity().result(timeout=180)
    assert (seen["uid"], seen["gid"]) == (10001, 10001)
    assert seen["pid"] == 1, "the runner is the container's PID 1"
    assert seen["seccomp"] == "2", "RuntimeDefault seccomp filters syscalls (mode 2)"
    assert seen["no_new_privs"] == "1", "allowPrivilegeEscalation: false"
    assert seen["effective_caps"] == "0000000000000000", "every capability dropped"


def test_a_root_image_with_run_as_non_root_is_refused_by_the_kubelet(
    on_cluster: K8sCluster, tmp_path: Path
) -> None:
    """The kubelet, not the API server, refuses it: the pod is created and its
    container never starts (CreateContainerConfigError)."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "root-image"},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True},
            "containers": [
                {"name": "main", "image": "python:3.11-slim", "command": ["python", "-c", "1"]}
            ],
        },
    }
    path = tmp_path / "pod.json"
    path.write_text(json.dumps(pod))
    on_cluster.kubectl("apply", "-n", on_cluster.namespace, "-f", str(path))
    try:

        def waiting() -> dict[str, Any] | None:
            status = on_cluster.get("pod", "root-image")["status"]
            for container in status.get("containerStatuses") or []:
                reason = (container["state"].get("waiting") or {}).get("reason")
                if reason == "CreateContainerConfigError":
                    return container["state"]["waiting"]  # type: ignore[no-any-return]
            return None

        state = wait_until(waiting, 120, "the kubelet to refuse the container")
        assert "runAsNonRoot" in state["message"] and "root" in state["message"]
    finally:
        on_cluster.kubectl(
            "delete", "pod", "root-image", "-n", on_cluster.namespace, "--wait=false"
        )


def test_an_image_whose_user_is_root_still_runs_a_call_as_10001(on_cluster: K8sCluster) -> None:
    """ascend sets runAsUser itself, so an image whose user is root (the runner image
    without its USER line, served by the suite as ``<runner image>-root``) is not refused
    by the kubelet and does not run the call as root."""
    from ascend.backends._kubernetes._spec import default_image

    seen = identity.options(image=f"{default_image()}-root")().result(timeout=180)
    assert seen["uid"] == 10001


def test_an_image_missing_from_the_registry_is_an_image_pull_error(on_cluster: K8sCluster) -> None:
    """containerd asks the suite's registry (through the docker.io mirror) and gets 404."""
    with pytest.raises(ascend.ImagePullError, match="python:0.0-none"):
        identity.options(image="python:0.0-none")().result(timeout=180)


def test_a_cancelled_calls_pod_is_gone_within_5_seconds(on_cluster: K8sCluster) -> None:
    fut = sleeper(600)
    assert next(iter(fut.logs())) == "sleeping"
    assert fut.cancel()
    cancelled = time.monotonic()
    wait_until(lambda: not _pods(on_cluster, fut.job_id), 30, "the pod to be gone")
    assert time.monotonic() - cancelled < 5
