"""The backend contract suite: behaviour every backend must show, written once.

Each test here takes the ``backend`` fixture, which configures ascend for one backend
and yields its name. ``nox -s tests`` runs the suite on the local backend; ``nox -s e2e``
runs the same tests on the Kubernetes backend against the test cluster (the
``kubernetes`` parameter carries the ``k8s`` marker). A behaviour that only one backend
can show belongs in that backend's own tests, not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import ascend
from tests.cluster.shared import Shared
from tests.integration.conftest import blockbuster  # noqa: F401  (the same detector)

if TYPE_CHECKING:
    from tests.cluster.fixtures_k8s import K8sCluster


@pytest.fixture(
    params=[
        pytest.param("local", id="local"),
        pytest.param("kubernetes", id="kubernetes", marks=pytest.mark.k8s),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """ascend configured for the backend under test, with storage every worker can read."""
    if request.param == "local":
        storage = tmp_path_factory.mktemp("contract-storage")
        ascend.configure(backend="local", storage=storage.as_uri())
        return "local"
    request.getfixturevalue("clean_jobs")
    request.getfixturevalue("on_cluster")  # configured as every Kubernetes test is
    return "kubernetes"


@pytest.fixture
def shared(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Shared:
    """A folder this test and the backend's workers share (heartbeats, gates): a host
    folder for local workers, the cluster's shared storage for pods (containers see no
    host folder)."""
    if backend == "kubernetes":
        cluster: K8sCluster = request.getfixturevalue("k8s_cluster")
        return cluster.shared(tmp_path / "shared")
    folder = tmp_path / "shared"
    folder.mkdir()
    return Shared(folder.as_uri())
