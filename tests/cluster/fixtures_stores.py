"""pytest fixtures for the object-store emulators and the OCI registry.

Each store is started once per session; the fixture puts the store's environment
(credentials) into this process, as a user's shell would, and tests use a fresh prefix.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.cluster import hostenv, stores


def _start(
    name: str, tmp_path_factory: pytest.TempPathFactory, **options: object
) -> Iterator[stores.Store | stores.Registry]:
    workdir = tmp_path_factory.mktemp(f"store-{name}")
    # Pods reach only the suite's own address, never 127.0.0.1.
    hostenv.add_address(hostenv.SERVICE_ADDRESS)
    service = stores.STARTERS[name](workdir, host=hostenv.SERVICE_ADDRESS, **options)  # type: ignore[operator]
    try:
        yield service
    finally:
        service.stop()
        if not hostenv.cluster_running():
            hostenv.remove_address(hostenv.SERVICE_ADDRESS)


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stores.Store]:
    yield from _start("s3", tmp_path_factory)  # type: ignore[misc]


@pytest.fixture(scope="session")
def gcs_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stores.Store]:
    yield from _start("gcs", tmp_path_factory)  # type: ignore[misc]


@pytest.fixture(scope="session")
def azure_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stores.Store]:
    yield from _start("azure", tmp_path_factory)  # type: ignore[misc]


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stores.Registry]:
    yield from _start("registry", tmp_path_factory)  # type: ignore[misc]


@pytest.fixture(params=["s3", "gcs", "azure"])
def cloud_store(request: pytest.FixtureRequest) -> stores.Store:
    """Each cloud store in turn, with its environment active in this process."""
    store: stores.Store = request.getfixturevalue(f"{request.param}_store")
    store.activate()
    return store


@pytest.fixture
def store_prefix(cloud_store: stores.Store) -> str:
    """A fresh folder URL in the current cloud store."""
    return f"{cloud_store.url}/{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stores.Registry]:
    """A registry that asks every request for Basic auth (htpasswd); its credentials are
    in ``credentials`` and ``docker_config()``."""
    yield from _start("registry", tmp_path_factory, private=True)  # type: ignore[misc]
