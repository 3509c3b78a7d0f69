"""The driver of a GPU call's target nodes, read from the test cluster's real node
objects (GPU Feature Discovery's label put on its GPU node): what picks torch's CUDA
build. No build runs here: it would reach download.pytorch.org."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anyio
import pytest

import ascend
from ascend import _environments
from ascend._resources import Resources
from ascend.backends._kubernetes import KubernetesBackend
from tests.cluster.fixtures_k8s import K8sCluster

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

    async def ask() -> int | None:
        backend = KubernetesBackend(settings)
        try:
            return await backend.cuda_driver_major(Resources.build(**options), settings)
        finally:
            await backend.aclose()

    return anyio.run(ask)


def test_a_gpu_calls_target_nodes_driver_comes_from_their_label(labelled: list[str]) -> None:
    assert _driver(gpu=1) == 550


def test_a_cpu_call_has_no_target_driver(labelled: list[str]) -> None:
    assert _driver() is None


def test_unlabelled_gpu_nodes_leave_the_driver_unknown(on_cluster: K8sCluster) -> None:
    assert _driver(gpu=1) is None


def test_an_environment_for_gpu_calls_resolves_torch_against_their_drivers_index(
    labelled: list[str],
) -> None:
    """``ascend env build --gpu 1`` and a ``gpu=1`` call share this step: torch resolves
    against the CUDA index the labelled driver (550) runs."""
    settings = ascend.configure()
    spec = _environments.spec_for(settings, ["torch==2.6"], platform="linux/amd64")

    async def resolve(gpu: int) -> tuple[str, ...]:
        backend = KubernetesBackend(settings)
        try:
            resources = Resources.build(gpu=gpu)
            found = await _environments.resolve_spec(spec, settings, resources, backend, print)
            return found.extra_index_urls
        finally:
            await backend.aclose()

    assert anyio.run(resolve, 1) == ("https://download.pytorch.org/whl/cu124",)
    assert anyio.run(resolve, 0) == ()
