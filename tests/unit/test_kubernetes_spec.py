"""The Job manifest: replacement and failure policies, and where its pods may run."""

from __future__ import annotations

from typing import Any

from ascend._config import Settings
from ascend._resources import Resources
from ascend.backends import Job
from ascend.backends._kubernetes._placement import Placement
from ascend.backends._kubernetes._spec import job_manifest
from tests.jobs import a_job


def _job(settings: Settings | None = None, units: int = 1, **options: Any) -> Job:
    settings = settings or Settings(storage="file:///tmp/unused")
    return a_job(settings, resources=Resources.build(**options), items=units)


def test_a_replacement_pod_waits_for_the_one_it_replaces_to_stop() -> None:
    assert job_manifest(_job(), session="s")["spec"]["podReplacementPolicy"] == "Failed"


def test_disruptions_are_ignored_before_any_exit_code_rule_applies() -> None:
    for units in (1, 3):
        rules = job_manifest(_job(units=units), session="s")["spec"]["podFailurePolicy"]["rules"]
        assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
        assert rules[1]["action"] == ("FailIndex" if units > 1 else "FailJob")


def test_a_gpu_model_without_a_node_list_becomes_affinity_limit_and_toleration() -> None:
    spec = job_manifest(_job(gpu="H100:2"), session="s")["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert "NVIDIA-H100" in required["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]


def test_an_instance_type_is_a_node_selector_as_before() -> None:
    spec = job_manifest(_job(node_type="m5.large"), session="s")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": "m5.large"}
    assert "affinity" not in spec and "tolerations" not in spec


def test_a_placements_labels_and_claims_reach_the_job_and_its_pods() -> None:
    placement = Placement(
        labels={"kueue.x-k8s.io/queue-name": "team-a"},
        resource_claims=({"name": "gpu", "resourceClaimTemplateName": "one-gpu"},),
    )
    manifest = job_manifest(_job(), session="s", placement=placement)
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    template = manifest["spec"]["template"]
    assert template["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert template["spec"]["resourceClaims"][0]["name"] == "gpu"


def test_a_registry_secret_becomes_the_pods_image_pull_secret() -> None:
    plain = job_manifest(_job(), session="s")["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in plain
    settings = Settings(storage="file:///tmp/unused", registry_secret="pull-creds")
    spec = job_manifest(_job(settings), session="s")["spec"]["template"]["spec"]
    assert spec["imagePullSecrets"] == [{"name": "pull-creds"}]
