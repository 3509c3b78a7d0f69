"""The driver of a GPU call's target nodes, read from the test cluster's real node
objects (GPU Feature Discovery's label put on its GPU node): what picks torch's CUDA
build. No build runs here: it would reach download.pytorch.org."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anyio
import pytest

import ascend
from ascend._resources import Resources
from ascend.backends._kubernetes import KubernetesBackend
from tests.cluster.fixtures_k8s import K8sCluster
from tests.jobs import a_job

pytestmark = pytest.mark.k8s
LABEL = "nvidia.com/cuda.driver.major"


def _gpu_nodes(cluster: K8sCluster) -> list[str]:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    return [
        n["metadata"]["name"]
        for n in nodes
        if int((n["status"].get("allocatable") or {}).get("nvidia.com/gpu", "0")) > 0
    ]


@pytest.fixture
def labelled(on_cluster: K8sCluster) -> Iterator[list[str]]:
    gpu_nodes = _gpu_nodes(on_cluster)
    if not gpu_nodes:
        pytest.fail("the test cluster has no GPU node")
    for name in gpu_nodes:
        on_cluster.kubectl("label", "node", name, f"{LABEL}=550", "--overwrite")
    try:
        yield gpu_nodes
    finally:
        for name in gpu_nodes:
            on_cluster.kubectl("label", "node", name, f"{LABEL}-", check=False)


def _driver(**options: object) -> int | None:
    settings = ascend.configure()
    job = a_job(settings, resources=Resources.build(**options))

    async def ask() -> int | None:
        backend = KubernetesBackend(settings)
        try:
            return await backend.cuda_driver_major(job)
        finally:
            await backend.aclose()

    return anyio.run(ask)


def test_a_gpu_calls_target_nodes_driver_comes_from_their_label(labelled: list[str]) -> None:
    assert _driver(gpu=1) == 550


def test_a_cpu_call_has_no_target_driver(labelled: list[str]) -> None:
    assert _driver() is None


def test_unlabelled_gpu_nodes_leave_the_driver_unknown(on_cluster: K8sCluster) -> None:
    assert _driver(gpu=1) is None
