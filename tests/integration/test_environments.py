"""Environments on the local backend: built once with uv from a local wheel index,
fetched and unpacked by the stdlib-only bootstrap, run by a plain interpreter."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import ascend
from ascend import _config, _environments
from ascend._storage import Storage
from tests.envindex import TEST_MODULE, TEST_PACKAGE, TEST_VALUE, wheel_index

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wheel_index(tmp_path_factory.mktemp("wheels"), with_build_tools=True)


@pytest.fixture
def storage(wheels: Path, tmp_path: Path) -> Path:
    """Local storage; builds resolve only from the suite's wheel index, never PyPI."""
    folder = tmp_path / "storage"
    ascend.configure(
        backend="local", storage=folder.as_uri(), index_url="none", find_links=str(wheels)
    )
    return folder


def uses_test_package() -> tuple[str, int, str]:
    import sys

    import ascend_envtest_pkg  # type: ignore[import-not-found]

    return ascend_envtest_pkg.VALUE, sys.flags.no_site, ascend_envtest_pkg.__file__


async def _spec(
    settings: _config.Settings, platform: str | None = _environments.HOST
) -> _environments.EnvironmentSpec:
    """Specs read the runner's files: off the loop, as the scheduler does."""
    return await anyio.to_thread.run_sync(
        lambda: _environments.spec_for(settings, [TEST_PACKAGE], platform=platform)
    )


def _archives(storage: Path) -> list[Path]:
    return sorted((storage / "envs" / "sha256").glob("*.tar.gz"))


def test_the_test_package_is_not_installed_here() -> None:
    with pytest.raises(ImportError):
        __import__(TEST_MODULE)


def test_a_call_imports_a_requirement_built_into_its_environment(storage: Path) -> None:
    fn = ascend.remote(requirements=[f"{TEST_PACKAGE}==1.0"])(uses_test_package)
    fut = fn()
    value, no_site, module_file = fut.result(timeout=120)
    assert value == TEST_VALUE
    assert no_site == 1  # a plain interpreter: no site-packages of the test venv
    assert "/ascend/envs/" in module_file
    assert len(_archives(storage)) == 1
    assert any(f"+ {TEST_PACKAGE}==1.0" in line for line in fut.logs())


def test_a_second_call_with_the_same_requirements_builds_nothing(storage: Path) -> None:
    fn = ascend.remote(requirements=[f"{TEST_PACKAGE}==1.0"])(uses_test_package)
    fn().result(timeout=120)
    [archive] = _archives(storage)
    written = archive.stat().st_mtime_ns
    again = fn.options(requirements=[f"{TEST_PACKAGE} == 1.0"])()
    assert again.result(timeout=120)[0] == TEST_VALUE
    assert _archives(storage) == [archive]
    assert archive.stat().st_mtime_ns == written
    assert not any(line.startswith("[env]") for line in again.logs())


def test_an_environment_whose_archive_was_deleted_is_built_again(storage: Path) -> None:
    fn = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)
    fn().result(timeout=120)
    [archive] = _archives(storage)
    archive.unlink()  # e.g. a bucket lifecycle rule; the manifest stays
    again = fn()
    assert again.result(timeout=120)[0] == TEST_VALUE
    assert _archives(storage) == [archive]
    assert any("Installed" in line for line in again.logs())


def test_ten_concurrent_identical_calls_cause_one_build(storage: Path) -> None:
    fn = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)
    futures = [fn() for _ in range(10)]
    assert all(f.result(timeout=180)[0] == TEST_VALUE for f in futures)
    builds = [f for f in futures if any("Installed" in line for line in f.logs())]
    assert len(builds) == 1
    assert len(_archives(storage)) == 1


def test_a_failing_requirement_fails_the_call_with_image_build_error(storage: Path) -> None:
    fn = ascend.remote(requirements=["ascend-envtest-missing==9"])(uses_test_package)
    with pytest.raises(ascend.ImageBuildError) as caught:
        fn().result(timeout=120)
    assert caught.value.requirement == "ascend-envtest-missing==9"
    assert "ascend-envtest-missing" in caught.value.log
    assert "Fix:" in str(caught.value)
    assert _archives(storage) == []  # and no fallback ran the function anyway


def test_concurrent_calls_with_a_failing_requirement_share_one_failed_build(
    storage: Path,
) -> None:
    fn = ascend.remote(requirements=["ascend-envtest-missing==9"])(uses_test_package)
    futures = [fn() for _ in range(5)]
    for fut in futures:
        with pytest.raises(ascend.ImageBuildError, match="ascend-envtest-missing"):
            fut.result(timeout=120)
    builds = [f for f in futures if any("[env]" in line for line in f.logs())]
    assert len(builds) == 1


def test_a_failed_build_is_retried_by_the_next_call(storage: Path, wheels: Path) -> None:
    fn = ascend.remote(requirements=["ascend-envtest-later"])(uses_test_package)
    with pytest.raises(ascend.ImageBuildError):
        fn().result(timeout=120)
    from tests.envindex import write_wheel

    source = f"VALUE = {TEST_VALUE!r}\n".encode()
    extra = wheels.parent / "later"
    extra.mkdir(exist_ok=True)
    write_wheel(extra, "ascend-envtest-later", "1.0", {"ascend_envtest_later/__init__.py": source})
    ascend.configure(find_links=f"{wheels} {extra}")
    later = ascend.remote(requirements=["ascend-envtest-later", TEST_PACKAGE])(uses_test_package)
    assert later().result(timeout=120)[0] == TEST_VALUE


@pytest.mark.anyio
async def test_builds_of_the_same_spec_are_byte_identical(storage: Path) -> None:
    settings = _config.current()
    spec = await _spec(settings)
    first = await _environments.build_archive(spec)
    assert first == await _environments.build_archive(spec)


def test_an_environment_carries_unchecked_bytecode_of_its_modules(
    storage: Path, tmp_path: Path
) -> None:
    """Pods cannot write ``__pycache__`` into their environment: it ships compiled, as
    hash-based pycs that are never checked against their sources (PEP 552 flags 0b01),
    and an interpreter that may write nothing imports them as they are."""
    settings = _config.current()
    spec = anyio.run(_spec, settings)
    archive = anyio.run(_environments.build_archive, spec)
    name = f"{TEST_MODULE}/__pycache__/__init__.{sys.implementation.cache_tag}.pyc"
    env = tmp_path / "env"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        pyc = tar.extractfile(name)
        assert pyc is not None
        header = pyc.read(16)
        tar.extractall(env, filter="data")
    assert int.from_bytes(header[4:8], "little") == 0b01  # hash-based, unchecked
    env.chmod(0o555)  # as read-only as an image's root-owned folder
    code = f"import sys; sys.path.insert(0, {str(env)!r}); import {TEST_MODULE} as m; "
    code += "print(m.__cached__)"
    done = subprocess.run(
        [sys.executable, "-I", "-B", "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == str(env / name)


@pytest.mark.anyio
async def test_builds_for_linux_amd64_resolve_wheels_for_that_platform(storage: Path) -> None:
    settings = _config.current()
    spec = await _spec(settings, platform=None)
    assert spec.platform == "linux/amd64"
    lines: list[str] = []
    archive = await _environments.build_archive(spec, lines.append)
    assert archive[:2] == b"\x1f\x8b"
    assert any(TEST_PACKAGE in line for line in lines)


@pytest.mark.anyio
async def test_a_stale_lock_of_a_dead_builder_is_taken_over(storage: Path) -> None:
    settings = _config.current()
    spec = await _spec(settings)
    paths = _environments.EnvPaths.of(settings, spec.key)
    store = Storage(settings.storage, {})
    await store.write_json(paths.lock, {"host": "gone", "pid": 1, "created": time.time() - 60})
    env = await _environments.ensure(settings, spec, store, stale_after=30)
    assert env.built
    assert not await store.exists(paths.lock)


@pytest.mark.anyio
async def test_a_request_waiting_on_another_builder_gets_its_failure(storage: Path) -> None:
    settings = _config.current()
    spec = await _spec(settings)
    paths = _environments.EnvPaths.of(settings, spec.key)
    store = Storage(settings.storage, {})
    await store.write_json(paths.lock, {"host": "other", "pid": 1, "created": time.time()})

    async def other_builder_fails() -> None:
        await anyio.sleep(0.5)
        await store.write_json(
            paths.failure, {"message": "it broke", "requirement": "x", "log": "boom"}
        )
        await store.delete(paths.lock)

    async with anyio.create_task_group() as tg:
        tg.start_soon(other_builder_fails)
        with pytest.raises(ascend.ImageBuildError, match="it broke") as caught:
            await _environments.ensure(settings, spec, store)
    assert caught.value.log == "boom"


@pytest.mark.anyio
async def test_waiting_for_a_build_past_startup_timeout_is_a_startup_timeout(
    storage: Path,
) -> None:
    settings = dataclasses.replace(_config.current(), startup_timeout=1.0)
    spec = await _spec(settings)
    paths = _environments.EnvPaths.of(settings, spec.key)
    store = Storage(settings.storage, {})
    await store.write_json(paths.lock, {"host": "other", "pid": 1, "created": time.time()})
    with pytest.raises(ascend.StartupTimeout, match="startup_timeout=1"):
        await _environments.ensure(settings, spec, store, stale_after=3600)


_BUILD_IN_ANOTHER_PROCESS = """
import anyio, json, sys
from ascend import _config, _environments
from ascend._storage import Storage
settings = _config.resolve(json.loads(sys.argv[1]))
spec = _environments.spec_for(settings, [sys.argv[2]], platform=_environments.HOST)
env = anyio.run(_environments.ensure, settings, spec, Storage(settings.storage, {}))
print(json.dumps({"built": env.built, "sha256": env.sha256}))
"""


def test_concurrent_builds_from_several_processes_cause_one_build(
    storage: Path, wheels: Path
) -> None:
    settings = {"storage": storage.as_uri(), "index_url": "none", "find_links": str(wheels)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD_IN_ANOTHER_PROCESS, json.dumps(settings), TEST_PACKAGE],
            stdout=subprocess.PIPE,
            env={**os.environ, "XDG_CACHE_HOME": str(storage.parent / "cache")},
        )
        for _ in range(3)
    ]
    outcomes = [json.loads(p.communicate(timeout=180)[0]) for p in procs]
    assert sum(o["built"] for o in outcomes) == 1
    assert len({o["sha256"] for o in outcomes}) == 1


def _run_build_pod_script(
    settings: _config.Settings,
    requirements: list[str],
    work: Path,
    *,
    registry: str | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], _environments.EnvironmentSpec]:
    """Run the build Job's script the way its pod does — a plain interpreter, nothing of
    ascend importable, the request in ``ASCEND_BUILD`` — with storage paths for URLs;
    with ``registry``, an image build that pushes there (``env``: e.g. DOCKER_CONFIG)."""
    from ascend_runner import _envbuild
    from ascend_runner._storage import local_path

    spec = _environments.spec_for(settings, requirements)
    paths = _environments.EnvPaths.of(settings, spec.key)
    runner = Path(str(local_path(_environments.runner_url(settings, spec.runner))))
    runner.parent.mkdir(parents=True, exist_ok=True)
    runner.write_bytes(_environments.runner_archive())

    def where(url: str) -> str:
        return str(local_path(url))

    if registry is None:
        request = _environments.build_request(
            spec,
            runner=str(runner),
            archive=where(paths.archive),
            manifest=where(paths.manifest),
            failure=where(paths.failure),
        )
    else:
        request = _environments.build_request(
            spec, runner=str(runner), failure=where(paths.failure), registry=registry
        )
    # The base interpreter, as a stock image has it: pip, and nothing of ascend.
    python = getattr(sys, "_base_executable", sys.executable)
    pod_env = {"ASCEND_BUILD": json.dumps(request), "HOME": str(work), "PATH": "/usr/bin:/bin"}
    pod_env.update(env or {})
    has_pip = subprocess.run([python, "-I", "-c", "import pip"], check=False).returncode == 0
    if not has_pip:  # then uv comes from this machine instead of the index
        pod_env["ASCEND_UV"] = _environments.uv_binary()
    done = subprocess.run(
        [python, "-I", "-c", Path(_envbuild.__file__).read_text()],
        env=pod_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return done, spec


def test_the_build_pod_script_publishes_the_same_archive_as_a_local_build(
    storage: Path, tmp_path: Path
) -> None:
    settings = _config.current()
    done, spec = _run_build_pod_script(settings, [TEST_PACKAGE], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"+ {TEST_PACKAGE}" in done.stdout  # uv's output is the pod's log
    paths = _environments.EnvPaths.of(settings, spec.key)
    manifest = json.loads((storage / "envs" / "sha256" / f"{spec.key}.json").read_text())
    archive = (storage / "envs" / "sha256" / f"{spec.key}.tar.gz").read_bytes()
    assert manifest["sha256"] == __import__("hashlib").sha256(archive).hexdigest()
    assert manifest["key"] == spec.key
    assert archive == anyio.run(_environments.build_archive, spec)
    found = anyio.run(_environments._load, Storage(settings.storage, {}), paths, spec)
    assert found is not None and found.sha256 == manifest["sha256"]


def test_the_build_pod_script_publishes_its_failure_with_the_log(
    storage: Path, tmp_path: Path
) -> None:
    settings = _config.current()
    done, spec = _run_build_pod_script(settings, ["ascend-envtest-missing"], tmp_path)
    assert done.returncode == 1
    failure = json.loads((storage / "envs" / "sha256" / f"{spec.key}.failed").read_text())
    assert "ascend-envtest-missing" in failure["log"]
    assert not (storage / "envs" / "sha256" / f"{spec.key}.json").exists()
    error = _environments.build_error(spec, failure["log"].splitlines(), "build Job")
    assert error.requirement == "ascend-envtest-missing"


@pytest.mark.anyio
async def test_environments_are_built_listed_shown_and_pruned(storage: Path) -> None:
    settings = _config.current()
    lines: list[str] = []
    env = await _environments.build_environment(settings, [TEST_PACKAGE], on_line=lines.append)
    assert env.built
    assert env.spec.is_host  # the local backend's environments are for this machine
    assert any(TEST_PACKAGE in line for line in lines)
    again = await _environments.build_environment(settings, [TEST_PACKAGE])
    assert not again.built
    [listed] = await _environments.list_environments(settings)
    assert listed["key"] == env.key
    assert listed["sha256"] == env.sha256
    assert (await _environments.show_environment(settings, env.key[:8]))["key"] == env.key
    with pytest.raises(ascend.ConfigError, match="no environment"):
        await _environments.show_environment(settings, "zzzz")
    assert await _environments.prune_environments(settings, older_than=3600) == []
    assert await _environments.prune_environments(settings, dry_run=True) == [env.key]
    assert await _environments.prune_environments(settings) == [env.key]
    assert await _environments.list_environments(settings) == []
    assert _archives(storage) == []


@pytest.fixture
def stalled_index() -> Iterator[str]:
    """An index that accepts connections and never answers: a build against it hangs."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/simple/"
    finally:
        server.close()


def _uv_processes() -> list[int]:
    import psutil

    return [
        child.pid
        for child in psutil.Process().children(recursive=True)
        if "uv" in (child.name() or "")
    ]


def test_cancelling_a_call_stops_its_environment_build(storage: Path, stalled_index: str) -> None:
    ascend.configure(index_url=stalled_index, find_links=None)
    fut = ascend.remote(requirements=["ascend-envtest-stalled"])(uses_test_package)()
    deadline = time.monotonic() + 30
    while not _uv_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _uv_processes(), "the build never started"
    fut.cancel()
    locks = storage / "envs" / "sha256"
    deadline = time.monotonic() + 10
    while (_uv_processes() or list(locks.glob("*.lock"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _uv_processes() == []
    assert not list(locks.glob("*.lock")), "the build lock is released once uv is stopped"


def test_a_build_past_startup_timeout_fails_the_call_with_startup_timeout(
    storage: Path, stalled_index: str
) -> None:
    ascend.configure(index_url=stalled_index, find_links=None, startup_timeout=2)
    fut = ascend.remote(requirements=["ascend-envtest-stalled"])(uses_test_package)()
    with pytest.raises(ascend.StartupTimeout, match="startup_timeout=2"):
        fut.result(timeout=60)
    assert _uv_processes() == []


def test_a_missing_uv_is_a_config_error_naming_the_fix(
    storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASCEND_UV", "/nonexistent/uv")
    fut = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)()
    with pytest.raises(ascend.ConfigError, match=r"ascend-k8s\[build\]"):
        fut.result(timeout=60)


# -- startup_timeout bounds the environment's fetch, apart from timeout ---------------


def test_a_bootstrap_whose_store_stalls_gives_up_at_startup_timeout(tmp_path: Path) -> None:
    import socket

    from ascend_runner import _bootstrap, protocol

    server = socket.socket()  # accepts connections (the backlog) and never answers
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    cache = tmp_path / "cache"
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/env.tar.gz?X-Signature=secret"
        env = {
            "PATH": os.environ["PATH"],
            protocol.ENV_ENV_URL: url,
            protocol.ENV_ENV_SHA256: "0" * 64,
            protocol.ENV_ENV_CACHE: str(cache),
            protocol.ENV_STARTUP_TIMEOUT: "1.5",
        }
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-I", "-S", _bootstrap.__file__],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
    finally:
        server.close()
    assert done.returncode == protocol.ExitCode.STARTUP_TIMEOUT, done.stderr
    assert "startup timeout: still fetching and unpacking the environment" in done.stderr
    assert "secret" not in done.stderr  # a presigned URL's signature is never printed
    assert took < 30  # well before urllib's own 60 s read timeout
    assert list(cache.iterdir()) == []  # no half-unpacked folder left behind


def test_an_environment_fetch_past_startup_timeout_fails_the_call_with_startup_timeout(
    storage: Path, tmp_path: Path
) -> None:
    fn = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)
    fn().result(timeout=120)  # built and stored: only the fetch is left to time
    ascend.configure(startup_timeout=0.001)  # no unpack of an environment is that fast
    cold = fn.options(env={"ASCEND_ENV_CACHE": str(tmp_path / "cold-cache")})
    # The bound covers this client's own look-up of the environment too: on a busy
    # machine that can take longer than 1 ms, a StartupTimeout as well, but not the one
    # this test is about. Try again then; the fetch's is the one asserted.
    for _ in range(10):
        with pytest.raises(ascend.StartupTimeout) as caught:
            cold().result(timeout=60)
        assert "startup_timeout=0.001 s" in str(caught.value)
        if "was not ready within" not in str(caught.value):
            break
    assert "fetching and unpacking the environment" in str(caught.value)
    assert "timeout was not touched" in str(caught.value)


def _closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def test_an_unreachable_index_fails_the_build_naming_the_index_not_a_requirement(
    storage: Path,
) -> None:
    index = f"http://127.0.0.1:{_closed_port()}/simple/"
    ascend.configure(index_url=index, find_links=None)
    fut = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)()
    with pytest.raises(ascend.ImageBuildError) as caught:
        fut.result(timeout=120)
    assert caught.value.requirement is None
    assert f"the package index {index} is unreachable from this machine" in str(caught.value)
    assert "Connection refused" in str(caught.value)
    assert "index_url=... (ASCEND_INDEX_URL)" in str(caught.value)


def test_the_bootstrap_marks_the_runners_start_for_a_startup_probe(
    storage: Path, tmp_path: Path
) -> None:
    from ascend_runner import protocol

    marker = tmp_path / "started"
    fn = ascend.remote(requirements=[TEST_PACKAGE], env={protocol.ENV_STARTED_FILE: str(marker)})
    assert fn(uses_test_package)().result(timeout=120)[0] == TEST_VALUE
    assert marker.exists()
