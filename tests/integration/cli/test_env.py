"""``ascend env`` on the local backend: build, list, show and prune, through JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

import ascend
from tests.envindex import TEST_PACKAGE, TEST_VALUE, wheel_index
from tests.integration.cli.conftest import ascend_cli


@pytest.fixture
def local_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheels = wheel_index(tmp_path_factory.mktemp("cli-wheels"))
    storage = tmp_path_factory.mktemp("cli-env-storage")
    ascend.configure(
        backend="local", storage=storage.as_uri(), index_url="none", find_links=str(wheels)
    )
    return wheels


def _uses_test_package() -> str:
    import ascend_envtest_pkg  # type: ignore[import-not-found]

    return str(ascend_envtest_pkg.VALUE)


def test_env_build_makes_the_environment_a_call_then_finds(local_index: Path) -> None:
    built = ascend_cli("env", "build", TEST_PACKAGE)
    assert built.exit_code == 0, built.stderr
    assert built.json["built"] is True
    again = ascend_cli("env", "build", TEST_PACKAGE)
    assert (again.json["key"], again.json["built"]) == (built.json["key"], False)
    fn = ascend.remote(requirements=[TEST_PACKAGE])(_uses_test_package)
    assert fn().result(timeout=600) == TEST_VALUE
    listed = ascend_cli("env", "list").json
    assert [row["key"] for row in listed] == [built.json["key"]]
    assert listed[0]["created"].endswith("+00:00")  # ISO 8601 in UTC, as in jobs list
    shown = ascend_cli("env", "show", built.json["key"][:12]).json
    assert shown["sha256"] == built.json["sha256"]


def test_env_prune_dry_run_lists_what_prune_removes(local_index: Path) -> None:
    key = ascend_cli("env", "build", TEST_PACKAGE).json["key"]
    dry = ascend_cli("env", "prune", "--older-than", "0s", "--dry-run").json
    assert dry == [{"key": key, "removed": False, "action": "would remove"}]
    assert [row["key"] for row in ascend_cli("env", "list").json] == [key]
    pruned = ascend_cli("env", "prune", "--older-than", "0s").json
    assert pruned == [{"key": key, "removed": True, "action": "removed"}]
    assert ascend_cli("env", "list").json == []


def test_env_show_of_an_unknown_key_fails_naming_the_fix(local_index: Path) -> None:
    shown = ascend_cli("env", "show", "0000")
    assert shown.exit_code == 1
    assert "ascend env list" in shown.stderr


def test_env_build_with_a_requirement_nobody_serves_fails_with_its_name(
    local_index: Path,
) -> None:
    failed = ascend_cli("env", "build", "ascend-envtest-missing")
    assert failed.exit_code == 1
    assert "ascend-envtest-missing" in failed.stderr
