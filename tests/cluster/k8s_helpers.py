"""Listing the test cluster's objects from tests, through kubectl (one place for it)."""

from __future__ import annotations

import json
from typing import Any

from tests.cluster.fixtures_k8s import K8sCluster


def listed(
    cluster: K8sCluster, kind: str, selector: str | None = None, namespace: str | None = None
) -> list[dict[str, Any]]:
    """The ``kind`` objects (``pods``, ``jobs``...) in ``namespace`` (the test namespace
    unless given), only those matching the label ``selector`` when one is given."""
    args = ["get", kind, "-n", namespace or cluster.namespace, "-o", "json"]
    if selector:
        args += ["-l", selector]
    return json.loads(cluster.kubectl(*args).stdout)["items"]  # type: ignore[no-any-return]


def pods_of(cluster: K8sCluster, job_id: str) -> list[dict[str, Any]]:
    """The pods of ascend's job ``job_id`` (label ``ascend.dev/job-id``)."""
    return listed(cluster, "pods", f"ascend.dev/job-id={job_id}")


def jobs_of(cluster: K8sCluster, job_id: str) -> list[dict[str, Any]]:
    """The Kubernetes Jobs of ascend's job ``job_id`` (none once it is deleted)."""
    return listed(cluster, "jobs", f"ascend.dev/job-id={job_id}")
