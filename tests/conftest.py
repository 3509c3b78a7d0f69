"""Shared fixtures. Test-infrastructure fixtures come from the plugins listed here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import ascend
from ascend import _config

pytest_plugins = ["tests.cluster.fixtures_k8s", "tests.cluster.fixtures_stores"]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests run on asyncio, the loop ascend's users have."""
    return "asyncio"


@pytest.fixture(autouse=True)
def isolated_ascend(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Each test gets its own config dir, cache dir and storage folder, and no ASCEND_* env."""
    home = tmp_path_factory.mktemp("ascend-home")
    for var in [*_config._ENV.values(), "ASCEND_SIGNING_KEY"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    _config.reset()
    ascend.configure(stream_logs=False, progress=False)
    yield home
    _config.reset()


@pytest.fixture(autouse=True, scope="session")
def no_runner_outlives_the_tests() -> Iterator[None]:
    """Fail the run if any runner process started by these tests is left behind."""
    yield
    me = psutil.Process()
    leftovers = []
    for child in me.children(recursive=True):
        try:
            if "ascend_runner" in " ".join(child.cmdline()):
                leftovers.append(child)
        except psutil.NoSuchProcess:
            continue
    _gone, alive = psutil.wait_procs(leftovers, timeout=15)
    for proc in alive:
        proc.kill()
    assert not alive, f"runner processes outlived their calls: {[p.pid for p in alive]}"
