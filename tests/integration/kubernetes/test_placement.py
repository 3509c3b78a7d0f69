"""Placement by GPU model and disruptions, on the test cluster.

The GPU node gets the labels GPU Feature Discovery would give it for the duration of a
test (``kubectl label``, restored afterwards); evictions go through the Eviction API.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator

import pytest

import ascend
from tests.cluster.fixtures_k8s import K8sCluster, wait_until
from tests.cluster.k8s_helpers import listed
from tests.cluster.k8s_helpers import pods_of as _pods

pytestmark = pytest.mark.k8s

GPU_NODE = "gpu-1"
PRODUCT = "NVIDIA-A100-SXM4-80GB"


@pytest.fixture
def labelled_gpu_node(on_cluster: K8sCluster) -> Iterator[K8sCluster]:
    """The GPU node labelled as an A100-80GB node by GPU Feature Discovery."""
    on_cluster.kubectl(
        "label", "node", GPU_NODE, "--overwrite",
        f"nvidia.com/gpu.product={PRODUCT}", "nvidia.com/gpu.memory=81920",
        "nvidia.com/gpu.count=2",
    )  # fmt: skip
    try:
        yield on_cluster
    finally:
        on_cluster.kubectl(
            "label", "node", GPU_NODE,
            "nvidia.com/gpu.product-", "nvidia.com/gpu.memory-", "nvidia.com/gpu.count-",
        )  # fmt: skip


def _job_count(cluster: K8sCluster) -> int:
    return len(listed(cluster, "jobs"))


def _evict(cluster: K8sCluster, job_id: str) -> dict:
    """Evict the call's running pod through the Eviction API; returns the pod."""
    pod = wait_until(
        lambda: next(
            (p for p in _pods(cluster, job_id) if p["status"].get("phase") == "Running"
             and not p["metadata"].get("deletionTimestamp")),
            None,
        ),
        60,
        "a running pod to evict",
    )  # fmt: skip
    name = pod["metadata"]["name"]
    body = {"apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": name, "namespace": cluster.namespace}}  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(body, f)
    cluster.kubectl(
        "create", "--raw", f"/api/v1/namespaces/{cluster.namespace}/pods/{name}/eviction",
        "-f", f.name,
    )  # fmt: skip
    return pod


@ascend.remote
def node_name() -> str:
    return os.environ.get("HOSTNAME", "")


def _ran_on(cluster: K8sCluster, job_id: str) -> str:
    return str(_pods(cluster, job_id)[0]["spec"]["nodeName"])


def test_a_gpu_model_runs_on_the_node_labelled_with_it(labelled_gpu_node: K8sCluster) -> None:
    fut = node_name.options(gpu="a100-80gb")()
    fut.result(timeout=120)
    assert _ran_on(labelled_gpu_node, fut.job_id) == GPU_NODE
    pod = _pods(labelled_gpu_node, fut.job_id)[0]
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == [PRODUCT]


def test_a_fallback_list_picks_the_model_the_cluster_has(labelled_gpu_node: K8sCluster) -> None:
    fut = node_name.options(gpu=["H100", "A100:2"])()
    fut.result(timeout=120)
    assert _ran_on(labelled_gpu_node, fut.job_id) == GPU_NODE
    pod = _pods(labelled_gpu_node, fut.job_id)[0]
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_a_model_no_node_has_fails_before_any_job_exists(labelled_gpu_node: K8sCluster) -> None:
    before = _job_count(labelled_gpu_node)
    fut = node_name.options(gpu="H100")()
    with pytest.raises(ascend.Unschedulable, match=r"no node of the cluster has H100.*A100"):
        fut.result(timeout=60)
    assert _job_count(labelled_gpu_node) == before


def test_gpu_memory_beyond_every_node_fails_before_any_job_exists(
    labelled_gpu_node: K8sCluster,
) -> None:
    before = _job_count(labelled_gpu_node)
    with pytest.raises(ascend.Unschedulable, match="at least 100Gi per GPU"):
        node_name.options(gpu=1, gpu_memory="100Gi")().result(timeout=60)
    assert _job_count(labelled_gpu_node) == before


def test_a_user_who_may_not_list_nodes_is_warned_once_and_gets_the_schedulers_verdict(
    on_cluster: K8sCluster, caplog: pytest.LogCaptureFixture
) -> None:
    assert on_cluster.unprivileged_kubeconfig is not None
    ascend.configure(
        kubeconfig=str(on_cluster.unprivileged_kubeconfig), namespace=on_cluster.user_namespace
    )
    caplog.set_level("WARNING", logger="ascend")
    for _ in range(2):
        with pytest.raises(ascend.Unschedulable, match="The scheduler says"):
            node_name.options(gpu="H100")().result(timeout=120)
    warnings = [r for r in caplog.records if "cannot list nodes" in r.getMessage()]
    assert len(warnings) == 1


@ascend.remote
def slow_to_stop(seconds: float) -> str:
    # Holds on to its node after being told to stop, as a job saving a checkpoint does.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("running", flush=True)
    time.sleep(seconds)
    return "done"


def _stamp(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_a_replacement_pod_starts_only_after_the_evicted_one_stopped(
    on_cluster: K8sCluster,
) -> None:
    fut = slow_to_stop.options(gpu=1, retries=1)(600)
    evicted = _evict(on_cluster, fut.job_id)
    name = evicted["metadata"]["name"]

    def replacement() -> dict | None:
        return next((p for p in _pods(on_cluster, fut.job_id) if p["metadata"]["name"] != name),
                    None)  # fmt: skip

    new = wait_until(replacement, 120, "a replacement pod")
    old = next((p for p in _pods(on_cluster, fut.job_id) if p["metadata"]["name"] == name), None)
    created = _stamp(new["metadata"]["creationTimestamp"])
    if old is not None:  # still there: it must have stopped before its replacement came
        ended = old["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
        assert _stamp(ended) <= created
    # The evicted pod ignored SIGTERM: it held the GPU for its grace period.
    assert created >= _stamp(evicted["metadata"]["creationTimestamp"]) + datetime.timedelta(
        seconds=3
    )
    fut.cancel()


@ascend.remote
def pod_after(seconds: float) -> str:
    print("running", flush=True)
    time.sleep(seconds)
    return os.environ.get("HOSTNAME", "")


def test_an_evicted_call_runs_again_without_using_its_retries(on_cluster: K8sCluster) -> None:
    fut = pod_after.options(retries=0, max_preemptions=2)(15)
    evicted = _evict(on_cluster, fut.job_id)["metadata"]["name"]
    assert fut.result(timeout=240) not in ("", evicted)  # its replacement's answer
    assert fut.preemptions == 1


def test_a_call_evicted_more_than_max_preemptions_is_preempted(on_cluster: K8sCluster) -> None:
    fut = slow_to_stop.options(retries=2, max_preemptions=0)(600)
    _evict(on_cluster, fut.job_id)
    with pytest.raises(ascend.Preempted, match=r"1 time \(max_preemptions=0\).*Eviction") as e:
        fut.result(timeout=120)
    assert e.value.preemptions == 1


@pytest.fixture
def high_priority(on_cluster: K8sCluster) -> Iterator[str]:
    """A PriorityClass above every ascend pod's (they have none: priority 0)."""
    manifest = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                "metadata": {"name": "ascend-test-urgent"}, "value": 1000000}  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(manifest, f)
    on_cluster.kubectl("apply", "-f", f.name)
    try:
        yield "ascend-test-urgent"
    finally:
        on_cluster.kubectl("delete", "priorityclass", "ascend-test-urgent", check=False)


def test_a_call_preempted_by_a_higher_priority_pod_is_preempted(
    on_cluster: K8sCluster, high_priority: str
) -> None:
    fut = slow_to_stop.options(gpu=2, max_preemptions=0)(600)
    wait_until(lambda: fut.running(), 60, "the call to run")
    urgent = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "urgent", "namespace": on_cluster.namespace},
        "spec": {
            "priorityClassName": high_priority,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "containers": [{"name": "c", "image": "python:3.11-slim",
                            "command": ["python", "-c", "import time; time.sleep(5)"],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
    }  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(urgent, f)
    on_cluster.kubectl("apply", "-f", f.name)
    try:
        with pytest.raises(ascend.Preempted, match="PreemptionByScheduler") as caught:
            fut.result(timeout=120)
        assert caught.value.reasons == ["PreemptionByScheduler"]
    finally:
        on_cluster.kubectl(
            "delete", "pod", "urgent", "-n", on_cluster.namespace, "--wait=false", check=False
        )
