"""The test cluster behaves like Kubernetes: real Jobs, scheduling, logs, RBAC, watches."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.fixtures_k8s import K8sCluster, wait_until
from tests.cluster.k8s_helpers import listed

pytestmark = [pytest.mark.k8s, pytest.mark.usefixtures("clean_jobs")]


def job(
    name: str,
    script: str,
    *,
    image: str = "python:3.11",
    resources: dict[str, Any] | None = None,
    tolerate_gpu: bool = False,
    backoff: int = 0,
    **pod_spec: Any,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "command": ["python", "-u", "-c", textwrap.dedent(script)],
        # The last output lines become the termination message when it exits non-zero.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if resources:
        container["resources"] = resources
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container], **pod_spec}
    if tolerate_gpu:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": backoff, "template": {"spec": spec}},
    }


def apply(cluster: K8sCluster, manifest: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / f"{manifest['metadata']['name']}.json"
    path.write_text(json.dumps(manifest))
    cluster.kubectl("apply", "-n", cluster.namespace, "-f", str(path))


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond["type"] == kind and cond["status"] == "True":
            return cond  # type: ignore[no-any-return]
    return None


def pods_of(cluster: K8sCluster, job_name: str) -> list[dict[str, Any]]:
    return listed(cluster, "pods", f"job-name={job_name}")


def first_pod(cluster: K8sCluster, job_name: str, timeout: float = 60) -> dict[str, Any]:
    return wait_until(
        lambda: (pods_of(cluster, job_name) or [None])[0], timeout, f"a pod of {job_name}"
    )  # type: ignore[no-any-return]


def wait_job(cluster: K8sCluster, name: str, kind: str, timeout: float = 90) -> dict[str, Any]:
    return wait_until(  # type: ignore[no-any-return]
        lambda: (lambda j: j if condition(j, kind) else None)(cluster.get("job", name)),
        timeout,
        f"job {name} {kind}",
    )


@pytest.mark.anyio
async def test_job_created_with_the_official_client_completes(k8s_cluster: K8sCluster) -> None:
    from kubernetes_asyncio import client as k8s

    async with k8s_cluster.admin_api() as api:
        batch = k8s.BatchV1Api(api)
        await batch.create_namespaced_job(k8s_cluster.namespace, job("official", "print('hi')"))
        watch_from = (
            await batch.list_namespaced_job(k8s_cluster.namespace)
        ).metadata.resource_version
        from kubernetes_asyncio import watch

        completed = False
        async with watch.Watch().stream(
            batch.list_namespaced_job,
            k8s_cluster.namespace,
            resource_version=watch_from,
            field_selector="metadata.name=official",
            timeout_seconds=90,
        ) as stream:
            async for event in stream:
                conditions = event["object"].status.conditions or []
                if any(c.type == "Complete" and c.status == "True" for c in conditions):
                    completed = True
                    break
    assert completed


def _open_gate(cluster: K8sCluster, gate: str, pod: str) -> None:
    """Create ``gate``, a path inside the pod's container (with ``kubectl exec``)."""
    cluster.kubectl(
        "exec", "-n", cluster.namespace, pod, "--", "python", "-c", f"open({gate!r}, 'w')"
    )


def test_job_from_kubectl_apply_streams_logs_while_running(
    k8s_cluster: K8sCluster, tmp_path: Path
) -> None:
    gate = "/tmp/gate"  # inside the container
    apply(
        k8s_cluster,
        job(
            "streamer",
            f"""
        import os, time
        print("first line", flush=True)
        while not os.path.exists({gate!r}):
            time.sleep(0.05)
        print("second line", flush=True)
    """,
        ),
        tmp_path,
    )
    wait_until(
        lambda: first_pod(k8s_cluster, "streamer")["status"].get("phase") == "Running",
        60,
        "pod running",
    )
    follower = subprocess.Popen(
        k8s_cluster.kubectl_argv("logs", "-f", "-n", k8s_cluster.namespace, "job/streamer"),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert follower.stdout is not None
    assert follower.stdout.readline().strip() == "first line"
    assert not condition(k8s_cluster.get("job", "streamer"), "Complete"), (
        "the line came while the job ran"
    )
    _open_gate(k8s_cluster, gate, first_pod(k8s_cluster, "streamer")["metadata"]["name"])
    assert follower.stdout.readline().strip() == "second line"
    assert follower.wait(timeout=60) == 0
    wait_job(k8s_cluster, "streamer", "Complete")


def test_failing_command_fails_the_job_with_its_exit_code(
    k8s_cluster: K8sCluster, tmp_path: Path
) -> None:
    apply(k8s_cluster, job("failing", "import sys; print('about to fail'); sys.exit(7)"), tmp_path)
    failed = wait_job(k8s_cluster, "failing", "Failed")
    assert condition(failed, "Failed")["reason"] == "BackoffLimitExceeded"
    terminated = pods_of(k8s_cluster, "failing")[0]["status"]["containerStatuses"][0]["state"][
        "terminated"
    ]
    assert terminated["exitCode"] == 7 and terminated["reason"] == "Error"
    assert "about to fail" in terminated.get("message", "")


def test_gpu_pod_lands_on_the_gpu_node(k8s_cluster: K8sCluster, tmp_path: Path) -> None:
    apply(
        k8s_cluster,
        job(
            "gpu-one",
            "print('on gpu')",
            resources={"limits": {"nvidia.com/gpu": "1"}},
            tolerate_gpu=True,
        ),
        tmp_path,
    )
    wait_job(k8s_cluster, "gpu-one", "Complete")
    assert pods_of(k8s_cluster, "gpu-one")[0]["spec"]["nodeName"] == "gpu-1"


def test_too_many_gpus_stay_pending_as_unschedulable(
    k8s_cluster: K8sCluster, tmp_path: Path
) -> None:
    apply(
        k8s_cluster,
        job(
            "gpu-eight",
            "print('never')",
            resources={"limits": {"nvidia.com/gpu": "8"}},
            tolerate_gpu=True,
        ),
        tmp_path,
    )

    def unschedulable() -> dict[str, Any] | None:
        pod = first_pod(k8s_cluster, "gpu-eight")
        for cond in pod["status"].get("conditions") or []:
            if cond["type"] == "PodScheduled" and cond["status"] == "False":
                return cond  # type: ignore[no-any-return]
        return None

    cond = wait_until(unschedulable, 60, "PodScheduled=False")
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert pods_of(k8s_cluster, "gpu-eight")[0]["status"]["phase"] == "Pending"


def _running_pid(cluster: K8sCluster, job_name: str) -> int:
    pod = wait_until(
        lambda: (lambda p: p if p["status"].get("phase") == "Running" else None)(
            first_pod(cluster, job_name)
        ),
        60,
        "running pod",
    )
    logs = wait_until(
        lambda: cluster.kubectl(
            "logs", "-n", cluster.namespace, pod["metadata"]["name"], check=False
        ).stdout.strip(),
        30,
        "pid in logs",
    )
    return int(logs.splitlines()[0])


def test_deleting_a_running_job_kills_its_container(
    k8s_cluster: K8sCluster, tmp_path: Path
) -> None:
    apply(
        k8s_cluster,
        job(
            "victim",
            "import os, time; print(os.getpid(), flush=True); time.sleep(600)",
            terminationGracePeriodSeconds=2,
        ),
        tmp_path,
    )
    assert _running_pid(k8s_cluster, "victim") == 1  # the container's own PID 1
    k8s_cluster.kubectl(
        "delete", "job", "victim", "-n", k8s_cluster.namespace, "--cascade=background"
    )
    # The kubelet sends SIGTERM, which this PID 1 ignores, then SIGKILL after the pod's
    # grace period (2 s).
    wait_until(lambda: not pods_of(k8s_cluster, "victim"), 60, "pod removed")


def test_memory_hog_is_oom_killed(k8s_cluster: K8sCluster, tmp_path: Path) -> None:
    apply(
        k8s_cluster,
        job(
            "hog",
            "x = bytearray(400 * 2**20); import time; time.sleep(30)",
            resources={"limits": {"memory": "100Mi"}},
        ),
        tmp_path,
    )
    wait_job(k8s_cluster, "hog", "Failed")
    terminated = pods_of(k8s_cluster, "hog")[0]["status"]["containerStatuses"][0]["state"][
        "terminated"
    ]
    assert terminated["reason"] == "OOMKilled" and terminated["exitCode"] == 137


def test_pod_deadline_ends_the_pod_as_deadline_exceeded(
    k8s_cluster: K8sCluster, tmp_path: Path
) -> None:
    apply(
        k8s_cluster,
        # PID 1 ignores SIGTERM: the kubelet kills it after the grace period (2 s).
        job(
            "late",
            "import time; time.sleep(600)",
            activeDeadlineSeconds=2,
            terminationGracePeriodSeconds=2,
        ),
        tmp_path,
    )
    wait_job(k8s_cluster, "late", "Failed")
    pod = pods_of(k8s_cluster, "late")[0]
    assert pod["status"]["phase"] == "Failed" and pod["status"].get("reason") == "DeadlineExceeded"


def test_unknown_image_is_reported_as_an_image_pull_error(
    k8s_cluster: K8sCluster, tmp_path: Path
) -> None:
    apply(k8s_cluster, job("noimage", "print(1)", image="registry.invalid/nope:1"), tmp_path)

    def waiting_reason() -> str | None:
        statuses = first_pod(k8s_cluster, "noimage")["status"].get("containerStatuses") or []
        reason = statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None
        return reason if reason == "ImagePullBackOff" else None

    assert wait_until(waiting_reason, 60, "ImagePullBackOff") == "ImagePullBackOff"


def test_env_from_secret_and_configmap_reaches_the_process(
    k8s_cluster: K8sCluster, tmp_path: Path
) -> None:
    ns = k8s_cluster.namespace
    k8s_cluster.kubectl(
        "create",
        "secret",
        "generic",
        "smoke-secret",
        "-n",
        ns,
        "--from-literal=TOKEN=s3cr3t",
        check=False,
    )
    k8s_cluster.kubectl(
        "create", "configmap", "smoke-config", "-n", ns, "--from-literal=MODE=fast", check=False
    )
    manifest = job(
        "envy", "import os; print(os.environ['TOKEN'], os.environ['MODE'], os.environ['POD'])"
    )
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "smoke-secret", "key": "TOKEN"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    container["envFrom"] = [{"configMapRef": {"name": "smoke-config"}}]
    apply(k8s_cluster, manifest, tmp_path)
    wait_job(k8s_cluster, "envy", "Complete")
    pod = pods_of(k8s_cluster, "envy")[0]["metadata"]["name"]
    assert k8s_cluster.kubectl("logs", "-n", ns, pod).stdout.split() == ["s3cr3t", "fast", pod]


@pytest.mark.anyio
async def test_unprivileged_user_is_forbidden_outside_its_namespace(
    k8s_cluster: K8sCluster,
) -> None:
    from kubernetes_asyncio import client as k8s
    from kubernetes_asyncio.client.exceptions import ApiException

    if k8s_cluster.unprivileged_kubeconfig is None:
        pytest.skip("the kind cluster has no unprivileged test user")
    async with k8s_cluster.unprivileged_api() as api:
        batch = k8s.BatchV1Api(api)
        with pytest.raises(ApiException) as denied:
            await batch.create_namespaced_job(k8s_cluster.namespace, job("sneaky", "print(1)"))
        assert denied.value.status == 403 and "forbidden" in str(denied.value.body).lower()
        created = await batch.create_namespaced_job(
            k8s_cluster.user_namespace, job("allowed", "print(1)")
        )
        assert created.metadata.name == "allowed"
        await batch.delete_namespaced_job(
            "allowed", k8s_cluster.user_namespace, propagation_policy="Background"
        )


@pytest.mark.slow
def test_stopping_a_node_fails_its_pod_and_the_job_controller_reacts(
    k8s_cluster: K8sCluster, tmp_path: Path
) -> None:
    cluster = k8s_cluster.require_own_cluster("stopping a node")
    manifest = job(
        "orphan",
        "import os, time; print(os.getpid(), flush=True); time.sleep(600)",
        backoff=1,
        nodeSelector={"kubernetes.io/hostname": "cpu-2"},
    )
    apply(k8s_cluster, manifest, tmp_path)
    _running_pid(k8s_cluster, "orphan")
    node = cluster.nodes["cpu-2"]
    node.stop()
    try:
        assert not node.tasks()  # machine death: nothing of the node runs, containers included
        wait_until(
            lambda: any(
                c["type"] == "Ready" and c["status"] != "True"
                for c in k8s_cluster.get("node", "cpu-2", "default")["status"]["conditions"]
            ),
            60,
            "node NotReady",
        )
    finally:
        node.start()
        node.wait_ready()
    # The restarted node reports the lost pod; the Job controller counts the failure
    # and, with backoffLimit 1, starts a replacement.
    wait_until(
        lambda: (k8s_cluster.get("job", "orphan")["status"].get("failed") or 0) >= 1,
        60,
        "job counted the failure",
    )
    # The controller delays the replacement by its back-off (10 s after a first failure),
    # and a loaded machine slows the controller-manager: be patient, then say what it is.
    try:
        wait_until(lambda: len(pods_of(k8s_cluster, "orphan")) >= 2, 180, "a replacement pod")
    except AssertionError as exc:
        status = k8s_cluster.get("job", "orphan").get("status")
        raise AssertionError(f"{exc}; the Job's status: {status}") from None


@pytest.mark.slow
@pytest.mark.anyio
async def test_watch_survives_an_apiserver_restart(k8s_cluster: K8sCluster) -> None:
    """A list+watch client re-establishes its watch after kube-apiserver restarts:
    it resumes from its resourceVersion, or re-lists when told 410 Gone."""
    import anyio
    from kubernetes_asyncio import client as k8s
    from kubernetes_asyncio import watch
    from kubernetes_asyncio.client.exceptions import ApiException

    cluster = k8s_cluster.require_own_cluster("restarting kube-apiserver")
    ns = k8s_cluster.namespace
    async with k8s_cluster.admin_api() as api:
        core = k8s.CoreV1Api(api)
        version = (await core.list_namespaced_config_map(ns)).metadata.resource_version

        async def watch_once() -> str:
            async with watch.Watch().stream(
                core.list_namespaced_config_map, ns, resource_version=version, timeout_seconds=5
            ) as stream:
                async for _event in stream:
                    pass
            return "ended"

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_once)
                await anyio.sleep(0.5)
                await anyio.to_thread.run_sync(cluster.control_plane.restart_apiserver)
        await core.create_namespaced_config_map(
            ns, {"metadata": {"name": "after-restart"}, "data": {"x": "1"}}
        )
        seen = relisted = False
        with anyio.fail_after(60):
            while not seen:
                try:
                    async with watch.Watch().stream(
                        core.list_namespaced_config_map,
                        ns,
                        resource_version=version,
                        timeout_seconds=10,
                    ) as stream:
                        async for event in stream:
                            if (
                                event["object"].metadata.name == "after-restart"
                                and event["type"] == "ADDED"
                            ):
                                seen = True
                                break
                except ApiException as exc:
                    assert exc.status == 410, exc
                    listing = await core.list_namespaced_config_map(ns)
                    relisted = True
                    seen = any(item.metadata.name == "after-restart" for item in listing.items)
                    version = listing.metadata.resource_version
        await core.delete_namespaced_config_map("after-restart", ns)
    assert seen, (
        f"the re-established watch (relisted: {relisted}) saw the object created after the restart"
    )
