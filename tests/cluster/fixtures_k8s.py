"""pytest fixtures for the Kubernetes test cluster (``k8s_cluster``).

The cluster is started once per session: a control plane compiled from Go modules and
three real kubelets with containerd and runc. With ``ASCEND_TEST_CLUSTER=kind`` the
fixture uses the kind cluster that ``python -m tests.cluster kind-up`` made; tests that
stop nodes or restart the apiserver are skipped there with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ascend.backends._kubernetes._spec import default_image
from tests.cluster import build, state
from tests.cluster.cluster import NAMESPACE, USER_NAMESPACE, Cluster
from tests.cluster.shared import Shared

# The suite's calls run on the runner image the test cluster serves, as on a cluster whose
# team publishes one: without it every test (each with storage of its own) would first
# build the runner-only environment. The default path (no image: stock base image and
# the bootstrap) is tested in tests/integration/test_environments_k8s.py.
SUITE_RUNNER_IMAGE = default_image()

if TYPE_CHECKING:  # the plugin loads in every session; the client only in e2e
    from kubernetes_asyncio import client as k8s


@dataclass
class K8sCluster:
    """What tests get from the ``k8s_cluster`` fixture."""

    kubeconfig: Path
    unprivileged_kubeconfig: Path | None
    namespace: str = NAMESPACE
    user_namespace: str = USER_NAMESPACE
    cluster: Cluster | None = None  # None when the cluster is not ours (kind)
    _configs: dict[Path, k8s.Configuration] = field(default_factory=dict)

    @property
    def nodes(self) -> dict[str, Any]:
        return self.cluster.nodes if self.cluster else {}

    @property
    def control_plane(self) -> Any:
        return self.cluster.control_plane if self.cluster else None

    def storage_settings(self, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
        """``ascend.configure`` arguments for storage every pod can read: a fresh prefix in
        the cluster's S3 store (pods are containers: they see no host folder; credentials
        reach them through a Secret); on kind a host folder (the client's folder is not
        the kind node's: use the suite's cluster or a cloud store there)."""
        if self.cluster is not None:
            return self.cluster.storage_settings()
        storage = tmp_path_factory.mktemp("k8s-storage")
        storage.chmod(0o777)
        return {"storage": storage.as_uri()}

    def shared(self, folder: Path) -> Shared:
        """A folder the test and every pod can read and write: a fresh prefix in the
        cluster's S3 store (``folder`` on kind)."""
        if self.cluster is not None and self.cluster.storage is not None:
            store = self.cluster.storage
            store.activate()
            return Shared(f"{store.url}/shared-{uuid.uuid4().hex}", store.storage_options)
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)
        return Shared(folder.as_uri())

    def require_own_cluster(self, what: str) -> Cluster:
        if self.cluster is None:
            pytest.skip(f"{what} needs the test cluster's own processes (not available on kind)")
        return self.cluster

    def kubectl_argv(self, *args: str, kubeconfig: Path | None = None) -> list[str]:
        """kubectl of the control plane's own version (or the installed one, on kind)."""
        binary = (
            [str(build.binary_path()), "kubectl"] if build.binary_path().exists() else ["kubectl"]
        )
        return [*binary, f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]

    def kubectl(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.kubectl_argv(*args, kubeconfig=kubeconfig),
            capture_output=True,
            text=True,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        result = self.kubectl("get", kind, name, "-n", namespace or self.namespace, "-o", "json")
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def __post_init__(self) -> None:
        # Loaded here, outside any test's event loop (loading reads files synchronously).
        for kubeconfig in (self.kubeconfig, self.unprivileged_kubeconfig):
            if kubeconfig is not None:
                self.configuration(kubeconfig)

    def configuration(self, kubeconfig: Path) -> k8s.Configuration:
        from kubernetes_asyncio import client as k8s
        from kubernetes_asyncio import config as k8s_config

        if kubeconfig not in self._configs:
            configuration = k8s.Configuration()
            asyncio.run(
                k8s_config.load_kube_config(str(kubeconfig), client_configuration=configuration)
            )
            self._configs[kubeconfig] = configuration
        return self._configs[kubeconfig]

    @contextlib.asynccontextmanager
    async def admin_api(self) -> AsyncIterator[k8s.ApiClient]:
        from kubernetes_asyncio import client as k8s

        async with k8s.ApiClient(self.configuration(self.kubeconfig)) as api:
            yield api

    @contextlib.asynccontextmanager
    async def unprivileged_api(self) -> AsyncIterator[k8s.ApiClient]:
        from kubernetes_asyncio import client as k8s

        assert self.unprivileged_kubeconfig is not None
        async with k8s.ApiClient(self.configuration(self.unprivileged_kubeconfig)) as api:
            yield api


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Poll ``predicate`` until it returns something truthy (tests only; bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest) -> Iterator[K8sCluster]:
    if os.environ.get("ASCEND_TEST_CLUSTER") == "kind":
        kubeconfig = state.kind_kubeconfig()
        if not kubeconfig.exists():
            pytest.fail(
                "ASCEND_TEST_CLUSTER=kind, but no kind cluster: run `python -m tests.cluster kind-up`"
            )
        yield K8sCluster(kubeconfig=kubeconfig, unprivileged_kubeconfig=None)
        return
    cluster = Cluster()
    cluster.start()
    try:
        yield K8sCluster(
            kubeconfig=cluster.kubeconfig,
            unprivileged_kubeconfig=cluster.unprivileged_kubeconfig,
            cluster=cluster,
        )
    finally:
        # The data folder (logs, etcd, nodes' disks) is kept for a session that failed.
        failed = request.session.testsfailed > 0
        cluster.stop(keep_data=failed)
        if failed:
            print(f"\ntest cluster's logs kept in {cluster.data_dir}", file=sys.stderr)
    # Real nodes change sysctls, links, mounts, cgroups and fixed paths: stopping the
    # cluster must put every one of them back.
    assert not cluster.host_changes, (
        f"stopping the real nodes left the host changed: {cluster.host_changes}"
    )


@pytest.fixture
def on_cluster(k8s_cluster: K8sCluster, tmp_path_factory: pytest.TempPathFactory) -> K8sCluster:
    """ascend configured for the test cluster, with storage every pod can read."""
    import ascend

    ascend.configure(
        backend="kubernetes",
        kubeconfig=str(k8s_cluster.kubeconfig),
        namespace=k8s_cluster.namespace,
        unschedulable_grace=2,
        image=SUITE_RUNNER_IMAGE,
        **k8s_cluster.storage_settings(tmp_path_factory),
    )
    return k8s_cluster


@pytest.fixture
def shared(k8s_cluster: K8sCluster, tmp_path: Path) -> Shared:
    """A folder this test and its pods share (gates, markers)."""
    return k8s_cluster.shared(tmp_path / "shared")


@pytest.fixture
def clean_jobs(k8s_cluster: K8sCluster) -> Iterator[None]:
    """Delete the test namespace's Jobs (and their pods) after a test."""
    yield
    k8s_cluster.kubectl(
        "delete",
        "jobs",
        "--all",
        "-n",
        k8s_cluster.namespace,
        "--cascade=background",
        "--wait=false",
        check=False,
    )
