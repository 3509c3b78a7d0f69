"""A slow image pull on real nodes: it counts against startup_timeout, never against
timeout (issue #13).

Each test pushes the suite's runner image plus a fresh layer of random bytes (no node
holds it) and has the nodes pull it through a proxy to the suite's registry that sends
``RATE`` bytes/s: the pull takes about ``LAYER_BYTES / RATE`` seconds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

import ascend
from tests.cluster import slowpull
from tests.cluster.fixtures_k8s import K8sCluster, wait_until
from tests.integration.kubernetes.test_startup import _add, _naps

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

LAYER_BYTES = 20 << 20
RATE = 1 << 20  # bytes/s: the pull takes about 20 s


@pytest.fixture
def slow_registry(on_cluster: K8sCluster) -> Iterator[slowpull.ThrottlingProxy]:
    cluster = on_cluster.require_own_cluster("a throttled path to the registry")
    with slowpull.throttled_registry(cluster, RATE) as proxy:
        yield proxy


@pytest.fixture
def slow_image(on_cluster: K8sCluster, slow_registry: slowpull.ThrottlingProxy) -> str:
    """A fresh image, pulled through the throttled path."""
    cluster = on_cluster.require_own_cluster("a throttled path to the registry")
    assert cluster.registry is not None
    return f"{slow_registry.url}/{slowpull.push_slow_image(cluster.registry.url, LAYER_BYTES)}"


def _objects(cluster: K8sCluster, kind: str, job_id: str) -> list[dict]:
    out = cluster.kubectl(
        "get", kind, "-n", cluster.namespace, "-l", f"ascend.dev/job-id={job_id}", "-o", "json"
    )
    return json.loads(out.stdout)["items"]


def _pull_seconds(cluster: K8sCluster, pod: str) -> float:
    """How long the kubelet took to pull the pod's image, from its ``Pulled`` event."""
    selector = f"involvedObject.name={pod},reason=Pulled"
    out = cluster.kubectl(
        "get", "events", "-n", cluster.namespace, "--field-selector", selector, "-o", "json"
    )
    [event] = json.loads(out.stdout)["items"]
    found = re.search(r"Successfully pulled image .* in ([0-9.]+)(m?s)", event["message"])
    assert found, event["message"]
    return float(found[1]) / (1000 if found[2] == "ms" else 1)


def test_an_image_pull_past_startup_timeout_is_a_startup_timeout_naming_the_pull(
    on_cluster: K8sCluster,
    slow_registry: slowpull.ThrottlingProxy,
    slow_image: str,
    clean_jobs: None,
) -> None:
    ascend.configure(startup_timeout=5)
    fut = _add.options(image=slow_image, timeout=600)(1, 1)
    with pytest.raises(ascend.StartupTimeout) as caught:
        fut.result(timeout=90)
    assert 0 < slow_registry.sent < LAYER_BYTES  # the pull was under way, not done
    assert not isinstance(caught.value, ascend.DeadlineExceeded)
    message = str(caught.value)
    assert "did not start within startup_timeout=5 s" in message
    assert f"pulling image {slow_image!r}" in message
    assert "timeout was not touched" in message
    wait_until(lambda: not _objects(on_cluster, "jobs", fut.job_id), 30, "the Job to go")
    pods = _objects(on_cluster, "pods", fut.job_id)
    assert all(p["metadata"].get("deletionTimestamp") for p in pods), pods
    # A kubelet does not cancel an image pull when its pod is deleted: the pod would
    # stay until the layer arrived. Cut the registry off so that it goes now.
    slow_registry.close()
    wait_until(lambda: not _objects(on_cluster, "pods", fut.job_id), 30, "the pod to go")


def test_an_image_pull_longer_than_timeout_is_not_counted_against_it(
    on_cluster: K8sCluster,
    slow_registry: slowpull.ThrottlingProxy,
    slow_image: str,
    clean_jobs: None,
) -> None:
    ascend.configure(startup_timeout=60)
    fut = _naps.options(image=slow_image, timeout=8)(3)
    assert fut.result(timeout=120) == "rested"
    [pod] = _objects(on_cluster, "pods", fut.job_id)
    assert _pull_seconds(on_cluster, pod["metadata"]["name"]) > 8  # longer than timeout
