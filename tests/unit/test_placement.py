"""Placement: GPU models, counts and memory, named node types, and the pre-flight check,
over the test cluster's recorded nodes relabelled as GPU Feature Discovery labels them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

import ascend
from ascend._config import NodeType, Settings
from ascend._resources import Resources
from ascend.backends._kubernetes._placement import (
    GFD_MEMORY,
    GFD_PRODUCT,
    INSTANCE_TYPE,
    inventory,
    plan,
    product_matches,
    request_of,
)

FIXTURES = Path(__file__).parent / "fixtures" / "k8s"


def _recorded_nodes() -> list[dict[str, Any]]:
    return json.loads((FIXTURES / "nodes.json").read_text())["nodes"]  # type: ignore[no-any-return]


def _gpu_node(name: str, product: str, memory_mib: int, gpus: int) -> dict[str, Any]:
    """The recorded GPU node, renamed and labelled as GFD labels such a node."""
    node = copy.deepcopy(next(n for n in _recorded_nodes() if n["metadata"]["name"] == "gpu-1"))
    node["metadata"]["name"] = name
    node["metadata"]["labels"].update(
        {GFD_PRODUCT: product, GFD_MEMORY: str(memory_mib), "nvidia.com/gpu.count": str(gpus)}
    )
    node["status"]["allocatable"]["nvidia.com/gpu"] = str(gpus)
    node["status"]["capacity"]["nvidia.com/gpu"] = str(gpus)
    return node


@pytest.fixture
def cluster() -> list[dict[str, Any]]:
    """Two CPU nodes, three A100-80GB nodes of 2 GPUs, two L4 nodes of 4, one T4."""
    cpu = [n for n in _recorded_nodes() if not n["metadata"]["name"].startswith("gpu")]
    return [
        *cpu,
        *(_gpu_node(f"a100-{i}", "NVIDIA-A100-SXM4-80GB", 81920, 2) for i in range(3)),
        *(_gpu_node(f"l4-{i}", "NVIDIA-L4", 23034, 4) for i in range(2)),
        _gpu_node("t4-0", "Tesla-T4", 15360, 1),
    ]


def _plan(nodes: list[dict[str, Any]] | None, settings: Settings | None = None, **options: Any):  # type: ignore[no-untyped-def]
    return plan(request_of(Resources.build(**options), settings or Settings()), nodes)


@pytest.mark.parametrize(
    ("wanted", "label", "matches"),
    [
        ("H100", "NVIDIA-H100-80GB-HBM3", True),
        ("h100", "NVIDIA-H100-80GB-HBM3", True),
        ("A100-80GB", "NVIDIA-A100-SXM4-80GB", True),
        ("a100 80gb", "NVIDIA-A100-SXM4-80GB", True),
        ("A100-80GB", "NVIDIA-A100-SXM4-40GB", False),
        ("A100", "NVIDIA-A100-PCIE-40GB", True),
        ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB", True),
        ("T4", "Tesla-T4", True),
        ("L4", "NVIDIA-L40S", False),
        ("H100", "NVIDIA-H200", False),
        ("A10", "NVIDIA-A100-SXM4-80GB", False),
    ],
)
def test_product_names_match_as_users_write_them(wanted: str, label: str, matches: bool) -> None:
    assert product_matches(wanted, label) is matches


def test_a_model_selects_the_exact_label_values_the_cluster_has(
    cluster: list[dict[str, Any]],
) -> None:
    placement = _plan(cluster, gpu="a100-80gb:2")
    assert placement.gpu == 2
    terms = placement.affinity["requiredDuringSchedulingIgnoredDuringExecution"]  # type: ignore[index]
    assert terms["nodeSelectorTerms"] == [
        {
            "matchExpressions": [
                {"key": GFD_PRODUCT, "operator": "In", "values": ["NVIDIA-A100-SXM4-80GB"]}
            ]
        }
    ]


def test_a_model_no_node_has_fails_at_once_naming_what_exists(
    cluster: list[dict[str, Any]],
) -> None:
    with pytest.raises(ascend.Unschedulable) as caught:
        _plan(cluster, gpu="H100")
    message = str(caught.value)
    assert "no node of the cluster has H100" in message
    assert "A100-SXM4-80GB x6" in message and "L4 22GB x8" in message and "T4 15GB x1" in message


def test_more_gpus_of_a_model_than_any_node_has_fails_at_once(
    cluster: list[dict[str, Any]],
) -> None:
    with pytest.raises(ascend.Unschedulable, match="A100-80GB:4"):
        _plan(cluster, gpu="A100-80GB:4")


def test_a_fallback_list_skips_models_the_cluster_lacks(cluster: list[dict[str, Any]]) -> None:
    placement = _plan(cluster, gpu=["H100", "L4", "T4"])
    terms = placement.affinity["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]  # type: ignore[index]
    assert [t["matchExpressions"][0]["values"] for t in terms] == [["NVIDIA-L4"], ["Tesla-T4"]]
    preferred = placement.affinity["preferredDuringSchedulingIgnoredDuringExecution"]  # type: ignore[index]
    assert [p["weight"] for p in preferred] == [100, 90]  # the first listed is preferred
    assert placement.gpu == 1


def test_a_fallback_list_keeps_only_choices_of_the_first_available_count(
    cluster: list[dict[str, Any]],
) -> None:
    placement = _plan(cluster, gpu=["H100:8", "A100:2", "L4"])
    assert placement.gpu == 2
    terms = placement.affinity["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]  # type: ignore[index]
    assert len(terms) == 1


def test_gpu_memory_is_a_lower_bound_in_mebibytes(cluster: list[dict[str, Any]]) -> None:
    placement = _plan(cluster, gpu=1, gpu_memory="40Gi")
    terms = placement.affinity["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]  # type: ignore[index]
    assert terms == [
        {"matchExpressions": [{"key": GFD_MEMORY, "operator": "Gt", "values": ["40959"]}]}
    ]
    with pytest.raises(ascend.Unschedulable, match="at least 100Gi per GPU"):
        _plan(cluster, gpu=1, gpu_memory="100Gi")


def test_a_plain_gpu_count_adds_no_affinity_and_keeps_the_toleration(
    cluster: list[dict[str, Any]],
) -> None:
    placement = _plan(cluster, gpu=2)
    assert placement.gpu == 2 and placement.affinity is None
    assert placement.tolerations[0]["key"] == "nvidia.com/gpu"


def test_more_gpus_than_any_node_has_fails_at_once(cluster: list[dict[str, Any]]) -> None:
    with pytest.raises(ascend.Unschedulable, match="no node of the cluster has 8 GPUs"):
        _plan(cluster, gpu=8)


def test_without_the_node_list_a_model_tries_the_usual_spellings() -> None:
    placement = _plan(None, gpu="A100-80GB")
    terms = placement.affinity["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]  # type: ignore[index]
    assert "NVIDIA-A100-80GB" in terms[0]["matchExpressions"][0]["values"]


def test_an_unknown_instance_type_fails_at_once(cluster: list[dict[str, Any]]) -> None:
    with pytest.raises(ascend.Unschedulable, match="cpu-standard x2"):
        _plan(cluster, node_type="n1-highmem-96")
    assert _plan(cluster, node_type="cpu-standard").node_selector == {INSTANCE_TYPE: "cpu-standard"}


def test_a_named_node_type_brings_its_gpu_selector_and_tolerations(
    cluster: list[dict[str, Any]],
) -> None:
    settings = Settings(
        node_types={
            "gpu_small": {
                "gpu": 1,
                "product": ["H100", "L4"],
                "selector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            }
        }
    )
    for node in cluster:
        node["metadata"]["labels"]["kubernetes.io/os"] = "linux"
    placement = _plan(cluster, settings, node_type="gpu_small")
    assert placement.gpu == 1
    assert placement.node_selector == {"kubernetes.io/os": "linux"}
    assert [t["key"] for t in placement.tolerations] == ["nvidia.com/gpu", "spot"]
    terms = placement.affinity["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]  # type: ignore[index]
    assert terms[0]["matchExpressions"][0]["values"] == ["NVIDIA-L4"]


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"gpu": "H100", "product": "L4"}, "not both"),
        ({"gpus": 1}, "unknown key 'gpus'"),
        ({"selector": {"a": 1}}, "selector must map"),
        ({"tolerations": [{"keys": "x"}]}, "tolerations must be"),
        ({"gpu": -1}, "whole number"),
    ],
)
def test_a_bad_node_type_table_names_the_problem(table: dict[str, Any], problem: str) -> None:
    with pytest.raises(ascend.ConfigError, match=problem):
        NodeType.build("bad", table)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"gpu": ""}, "not a GPU model"),
        ({"gpu": "H100:0"}, "not a GPU model"),
        ({"gpu": []}, "non-empty list"),
        ({"gpu": ["H100", 2]}, "not a GPU model"),
        ({"gpu": 1.5}, "whole number of GPUs"),
        ({"gpu_memory": "40Gi"}, "needs a GPU"),
        ({"gpu": 1, "gpu_memory": "lots"}, "not a memory quantity"),
        ({"max_preemptions": -1}, "max_preemptions"),
    ],
)
def test_bad_gpu_options_name_the_problem(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ascend.ConfigError, match=problem):
        Resources.build(**options)


def test_inventory_counts_gpus_per_model(cluster: list[dict[str, Any]]) -> None:
    assert inventory(cluster).startswith("A100-SXM4-80GB x6, L4 22GB x8, T4 15GB x1")


def test_a_cordoned_node_still_counts_as_able_to_run_a_request(
    cluster: list[dict[str, Any]],
) -> None:
    for node in cluster:
        node.setdefault("spec", {})["unschedulable"] = True  # a drain in progress
    assert _plan(cluster, gpu="T4").gpu == 1


def test_a_cpu_only_call_needs_no_node_list() -> None:
    request = request_of(Resources.build(cpu=2, memory="1Gi"), Settings())
    assert not request.constrained
    assert plan(request, None) == plan(request, [])
