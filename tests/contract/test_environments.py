"""Contract: a call's requirements are installed into its environment, on every backend;
a requirement that cannot be installed fails the call with ImageBuildError."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import ascend
from tests.cluster.shared import Shared
from tests.envindex import (
    TEST_PACKAGE,
    TEST_VALUE,
    repack_with_dependencies,
    serve,
    suite_address,
    wheel_index,
)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wheel_index(tmp_path_factory.mktemp("contract-wheels"), with_build_tools=True)


@pytest.fixture
def with_index(backend: str, wheels: Path, request: pytest.FixtureRequest) -> Iterator[None]:
    """Builds resolve only from the suite's wheel index: a folder here, HTTP for pods."""
    if backend == "local":
        ascend.configure(index_url="none", find_links=str(wheels))
        yield
        return
    cluster = request.getfixturevalue("k8s_cluster")
    # Pods reach the storage through the runner's S3 extra: the environment needs it too.
    repack_with_dependencies(["s3fs"], wheels)
    with serve(wheels, suite_address(cluster)) as url:
        ascend.configure(index_url="none", find_links=url)
        yield


def _uses_test_package() -> str:
    import ascend_envtest_pkg  # type: ignore[import-not-found]

    return str(ascend_envtest_pkg.VALUE)


def test_a_call_imports_a_requirement_installed_into_its_environment(
    backend: str, with_index: None
) -> None:
    fn = ascend.remote(requirements=[TEST_PACKAGE])(_uses_test_package)
    assert fn().result(timeout=600) == TEST_VALUE


def test_a_requirement_that_cannot_be_installed_fails_the_call_with_its_log(
    backend: str, with_index: None
) -> None:
    fn = ascend.remote(requirements=["ascend-envtest-missing"])(_uses_test_package)
    with pytest.raises(ascend.ImageBuildError) as caught:
        fn().result(timeout=600)
    assert caught.value.requirement == "ascend-envtest-missing"
    assert "ascend-envtest-missing" in caught.value.log


# -- startup_timeout and timeout are separate budgets --------------------------------


def _naps(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "rested"


def test_a_run_longer_than_startup_timeout_but_within_timeout_succeeds(backend: str) -> None:
    # startup_timeout bounds what comes before the function, never the function's run.
    ascend.configure(startup_timeout=5)
    fn = ascend.remote(timeout=60)(_naps)
    assert fn(8).result(timeout=120) == "rested"


def test_a_function_past_its_timeout_is_stopped_with_its_timeout_counted_from_its_start(
    backend: str,
) -> None:
    ascend.configure(startup_timeout=30)
    fn = ascend.remote(timeout=2)(_naps)
    with pytest.raises(ascend.DeadlineExceeded) as caught:
        fn(600).result(timeout=120)
    assert "timeout of 2 s per call (counted from the runner's start)" in str(caught.value)


@pytest.fixture
def shared_folder(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Shared:
    """A folder the test and every attempt of a call can use (attempt counters)."""
    if backend == "local":
        return Shared(tmp_path.as_uri())
    shared: Shared = request.getfixturevalue("shared")
    return shared


def _slow_the_first_time(folder: Shared) -> int:
    import time

    folder.append("attempts", "x")
    attempts = len(folder.read_text("attempts"))
    if attempts == 1:
        time.sleep(600)
    return attempts


def test_a_function_past_its_timeout_runs_again_when_retries_allow(
    backend: str, shared_folder: Shared
) -> None:
    fn = ascend.remote(timeout=3, retries=1)(_slow_the_first_time)
    assert fn(shared_folder).result(timeout=180) == 2
