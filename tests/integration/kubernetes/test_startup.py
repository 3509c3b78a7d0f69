"""startup_timeout on the test cluster: a pod that does not start in time fails its call
with StartupTimeout and its Job is deleted; the function's own run is timeout's alone."""

from __future__ import annotations

import json

import pytest

import ascend
from tests.cluster.fixtures_k8s import K8sCluster, wait_until

pytestmark = pytest.mark.k8s


def _jobs(cluster: K8sCluster, job_id: str) -> list[dict]:
    out = cluster.kubectl(
        "get", "jobs", "-n", cluster.namespace, "-l", f"ascend.dev/job-id={job_id}", "-o", "json"
    )
    return json.loads(out.stdout)["items"]


@ascend.remote
def _add(a: int, b: int) -> int:
    return a + b


@ascend.remote
def _naps(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "rested"


def test_a_pod_that_cannot_start_within_startup_timeout_fails_with_startup_timeout(
    on_cluster: K8sCluster, clean_jobs: None
) -> None:
    # No node has 64 CPUs; the grace for that is longer than startup_timeout, so the
    # earlier bound, startup_timeout, decides.
    ascend.configure(startup_timeout=3, unschedulable_grace=120)
    fut = _add.options(cpu=64)(1, 1)
    with pytest.raises(ascend.StartupTimeout) as caught:
        fut.result(timeout=90)
    message = str(caught.value)
    assert "did not start within startup_timeout=3 s" in message
    assert "not scheduled" in message and "Insufficient cpu" in message
    wait_until(lambda: not _jobs(on_cluster, fut.job_id), 60, "the Job to be deleted")


def test_the_pod_deadline_is_timeout_plus_startup_timeout(
    on_cluster: K8sCluster, clean_jobs: None
) -> None:
    ascend.configure(startup_timeout=40)
    fut = _naps.options(timeout=5)(0)
    assert fut.result(timeout=120) == "rested"
    # Finished Jobs stay (ttlSecondsAfterFinished): read what was created.
    [job] = _jobs(on_cluster, fut.job_id)
    assert job["spec"]["template"]["spec"]["activeDeadlineSeconds"] == 45
