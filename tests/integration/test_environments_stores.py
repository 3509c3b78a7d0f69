"""Environments in an object store (S3, moto): the archive, the create-only build lock
and the manifest live in the bucket; the bootstrap downloads the archive through a
presigned URL with nothing but the standard library."""

from __future__ import annotations

import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import anyio
import pytest

import ascend
from ascend import _config, _environments
from ascend._storage import Storage
from tests.cluster.stores import Store
from tests.envindex import (
    TEST_PACKAGE,
    TEST_VALUE,
    StallingProxy,
    repack_with_dependencies,
    wheel_index,
)

pytestmark = [pytest.mark.stores, pytest.mark.slow]


@pytest.fixture(scope="session")
def s3_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test package and the runner's dependencies with its S3 extra (s3fs and all it
    needs), from this venv's installed copies."""
    folder = wheel_index(tmp_path_factory.mktemp("s3-wheels"))
    repack_with_dependencies(["s3fs"], folder)
    return folder


@pytest.fixture
def on_s3(s3_store: Store, s3_wheels: Path) -> str:
    s3_store.activate()
    url = f"{s3_store.url}/{uuid.uuid4().hex}"
    ascend.configure(
        backend="local",
        storage=url,
        storage_options=s3_store.storage_options,
        index_url="none",
        find_links=str(s3_wheels),
    )
    return url


def uses_test_package() -> tuple[str, str]:
    import ascend_envtest_pkg  # type: ignore[import-not-found]
    import s3fs  # type: ignore[import-untyped]

    return ascend_envtest_pkg.VALUE, s3fs.__file__


def test_a_call_runs_in_an_environment_stored_in_s3(on_s3: str) -> None:
    fut = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)()
    value, s3fs_file = fut.result(timeout=300)
    assert value == TEST_VALUE
    assert "/ascend/envs/" in s3fs_file  # the runner's S3 extra came with the environment
    settings = _config.current()
    fs = Storage(settings.storage, settings.storage_options)
    listed = anyio.run(fs.list, _environments.envs_folder(settings))
    assert any(name.endswith(".tar.gz") for name in listed)
    assert not any(name.endswith(".lock") for name in listed)


@pytest.mark.anyio
async def test_only_one_of_two_storages_objects_takes_the_build_lock(on_s3: str) -> None:
    settings = _config.current()
    store = Storage(settings.storage, settings.storage_options)
    url = f"{_environments.envs_folder(settings)}/{'0' * 64}.lock"
    first = await _environments._create_only(store, url, b"{}")
    second = await _environments._create_only(store, url, b"{}")
    assert (first, second) == (True, False)


@pytest.mark.anyio
async def test_the_fetch_url_of_an_s3_archive_is_presigned(on_s3: str) -> None:
    settings = _config.current()
    store = Storage(settings.storage, settings.storage_options)
    url = f"{_environments.envs_folder(settings)}/x.tar.gz"
    await store.write(url, [b"data"])
    signed = await _environments.fetch_url(store, url)
    assert signed.startswith("http")
    assert "Signature" in signed or "X-Amz-Signature" in signed
    # As long as S3 lets a presigned URL live: a pod may start days after its call.
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(signed).query)
    if "X-Amz-Expires" in query:  # SigV4: seconds from signing
        assert int(query["X-Amz-Expires"][0]) == 7 * 24 * 3600
    else:  # SigV2 (what botocore signs for this endpoint): an epoch
        assert abs(int(query["Expires"][0]) - (time.time() + 7 * 24 * 3600)) < 600
    assert await anyio.to_thread.run_sync(_download, signed) == b"data"  # as the bootstrap


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


@pytest.mark.anyio
async def test_a_build_pod_can_write_through_a_presigned_put_url(on_s3: str) -> None:
    from ascend_runner import _envbuild

    settings = _config.current()
    store = Storage(settings.storage, settings.storage_options)
    url = f"{_environments.envs_folder(settings)}/put.tar.gz"
    signed = await _environments.write_url(store, url)

    await anyio.to_thread.run_sync(_envbuild.publish, signed, b"archive")
    assert bytes(await store.read(url)) == b"archive"


def test_an_environment_fetch_from_a_store_that_stalls_is_a_startup_timeout(
    on_s3: str, s3_store: Store, tmp_path: Path
) -> None:
    fn = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)
    assert fn().result(timeout=300)[0] == TEST_VALUE  # built and stored
    proxy = StallingProxy(s3_store.storage_options["endpoint_url"])
    try:
        ascend.configure(
            storage_options={**s3_store.storage_options, "endpoint_url": proxy.url},
            startup_timeout=3,
        )
        cold = fn.options(env={"ASCEND_ENV_CACHE": str(tmp_path / "cold-cache")})
        with pytest.raises(ascend.StartupTimeout) as caught:
            cold().result(timeout=120)
        assert proxy.stalled, "the bootstrap's download never reached the store"
        message = str(caught.value)
        assert "startup_timeout=3 s" in message
        assert "still fetching and unpacking the environment" in message
        assert "Signature" not in message  # the presigned URL's query is not printed
    finally:
        proxy.close()
