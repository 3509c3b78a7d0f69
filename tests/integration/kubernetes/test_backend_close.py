"""The Kubernetes backend closes what it opened."""

from __future__ import annotations

import pytest

from ascend._config import Settings
from ascend.backends._kubernetes import KubernetesBackend
from tests.cluster.fixtures_k8s import K8sCluster

pytestmark = [pytest.mark.k8s, pytest.mark.anyio]


async def test_aclose_stops_the_watches_and_closes_the_http_client(
    k8s_cluster: K8sCluster,
) -> None:
    settings = Settings(
        backend="kubernetes",
        kubeconfig=str(k8s_cluster.kubeconfig),
        namespace=k8s_cluster.namespace,
        storage="file:///tmp/unused",
    )
    backend = KubernetesBackend(settings)
    ns = await backend._namespace(settings)
    await ns.jobs.wait_synced()
    watches = list(ns._tasks)
    assert not any(t.done() for t in watches)
    await backend.aclose()
    assert all(t.done() for t in watches)
    assert ns.api._client.rest_client.pool_manager.closed
    # Used again afterwards, it connects afresh.
    again = await backend._namespace(settings)
    assert again is not ns
    await backend.aclose()
