"""The ``ascend`` command line on the local backend: settings, listing, results, gc,
doctor and exit codes (no cluster needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import ascend
from ascend import _config
from tests.integration.cli.conftest import ascend_cli


@ascend.remote
def double(x: int) -> int:
    print(f"doubling {x}", flush=True)
    return 2 * x


@ascend.remote
def fails() -> None:
    raise KeyError("nope")


@ascend.remote
def wait_for(path: str) -> str:
    import os
    import time

    while not os.path.exists(path):
        time.sleep(0.05)
    return "released"


def _prefix() -> Path:
    return Path(ascend.configure().user_prefix.removeprefix("file://"))


def test_list_status_and_result_of_local_calls() -> None:
    ok = double(21)
    assert ok.result(timeout=60) == 42
    bad = fails()
    with pytest.raises(KeyError):
        bad.result(timeout=60)
    mapped = double.map(range(3))
    assert list(mapped) == [0, 2, 4]

    rows = {r["job_id"]: r for r in ascend_cli("jobs", "list").json}
    assert rows[ok.job_id]["state"] == "succeeded"
    assert rows[bad.job_id]["state"] == "failed"
    assert rows[mapped.job_id]["state"] == "succeeded"
    assert (rows[mapped.job_id]["done"], rows[mapped.job_id]["failed"]) == (3, 0)
    assert (rows[mapped.job_id]["kind"], rows[mapped.job_id]["items"]) == ("map", 3)
    failed_only = ascend_cli("jobs", "list", "--status", "failed").json
    assert [r["job_id"] for r in failed_only] == [bad.job_id]
    assert ascend_cli("jobs", "status", ok.job_id).json["function"] == "double"
    assert ascend_cli("jobs", "result", ok.job_id).json["value"] == 42
    assert ascend_cli("jobs", "result", mapped.job_id).json["value"] == [0, 2, 4]
    raised = ascend_cli("jobs", "result", bad.job_id)
    assert raised.exit_code == 1 and raised.json["error"] == "KeyError: 'nope'"


@ascend.remote
def inverse(x: int) -> float:
    return 1 / x


def test_a_map_whose_items_raised_is_failed_with_its_counts_in_list_and_status() -> None:
    mapped = inverse.map([1, 0, 2, 0, 4], return_exceptions=True)
    assert sum(isinstance(r, ZeroDivisionError) for r in mapped) == 2

    row = {r["job_id"]: r for r in ascend_cli("jobs", "list").json}[mapped.job_id]
    assert (row["state"], row["done"], row["failed"]) == ("failed", 3, 2)
    status = ascend_cli("jobs", "status", mapped.job_id).json
    assert (status["state"], status["done"], status["failed"]) == ("failed", 3, 2)
    failed_only = ascend_cli("jobs", "list", "--status", "failed").json
    assert [r["job_id"] for r in failed_only] == [mapped.job_id]


def test_a_map_stopped_by_its_first_failure_is_failed_not_cancelled() -> None:
    mapped = inverse.map([0])
    with pytest.raises(ZeroDivisionError):
        mapped.result(timeout=60)
    status = ascend_cli("jobs", "status", mapped.job_id).json
    assert (status["state"], status["done"], status["failed"]) == ("failed", 0, 1)


@pytest.mark.parametrize("command", ["status", "logs", "result"])
@pytest.mark.parametrize("job_id", ["../jobs", "a/b", "Train-1", " train-1"])
def test_a_string_no_job_id_can_be_exits_1_naming_the_form(command: str, job_id: str) -> None:
    done = ascend_cli("jobs", command, job_id)
    assert done.exit_code == 1
    assert "is not an ascend job id" in done.stderr


def test_output_after_the_command_name_means_what_it_means_before() -> None:
    ok = double(4)
    assert ok.result(timeout=60) == 8
    before = ascend_cli("jobs", "list")
    after = ascend_cli("jobs", "list", "-o", "json", output_json=False)
    assert after.exit_code == 0, after.stderr
    assert [r["job_id"] for r in after.json] == [r["job_id"] for r in before.json]
    for args in (
        ("jobs", "status", ok.job_id, "--output", "json"),
        ("jobs", "result", ok.job_id, "-o", "json"),
        ("gc", "--dry-run", "-o", "json"),
        ("env", "list", "-o", "json"),
    ):
        done = ascend_cli(*args, output_json=False)
        assert done.exit_code == 0, (args, done.stderr)
        json.loads(done.stdout)  # the JSON form, not a table


def test_output_after_the_command_name_wins_over_the_one_before() -> None:
    ok = double(5)
    assert ok.result(timeout=60) == 10
    table = ascend_cli("jobs", "status", ok.job_id, "-o", "table")  # after "-o json"
    assert table.exit_code == 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(table.stdout)
    assert ok.job_id in table.stdout


def test_a_bad_output_after_the_command_name_is_a_usage_error() -> None:
    done = ascend_cli("jobs", "list", "-o", "yaml", output_json=False)
    assert done.exit_code == 2
    assert "table or json" in done.stderr


def test_logs_as_json_are_one_object_with_the_lines() -> None:
    ascend.configure(detach=True)  # the local backend stores a detached call's output
    ok = double(6)
    assert ok.result(timeout=60) == 12
    done = ascend_cli("jobs", "logs", ok.job_id, "-o", "json", output_json=False)
    assert done.exit_code == 0, done.stderr
    assert done.json["job_id"] == ok.job_id
    assert "doubling 6" in done.json["lines"]
    both = ascend_cli("jobs", "logs", ok.job_id, "-f", "-o", "json", output_json=False)
    assert both.exit_code == 2
    assert "drop one of them" in both.stderr


def test_logs_of_a_detached_local_call_come_from_its_stored_output() -> None:
    ascend.configure(detach=True)
    fut = double(5)
    assert fut.result(timeout=60) == 10
    logs = ascend_cli("jobs", "logs", fut.job_id, output_json=False)
    assert logs.exit_code == 0, logs.stderr
    assert "doubling 5" in logs.stdout.splitlines()


def test_gc_dry_run_lists_what_gc_removes_and_keeps_an_unfinished_call(tmp_path: Path) -> None:
    ascend.configure(blob_threshold=1024)
    big = list(range(3000))  # pickles to more than the threshold: stored as a blob

    @ascend.remote
    def size(data: list[int]) -> int:
        return len(data)

    done = size(big)
    assert done.result(timeout=60) == 3000
    release = tmp_path / "release"
    running = wait_for(str(release))
    try:
        time.sleep(1.5)
        dry = ascend_cli("gc", "--older-than", "1s", "--dry-run")
        planned = {(r["kind"], r["name"]) for r in dry.json}
        assert sorted(kind for kind, _ in planned) == ["blob", "folder"]
        assert not any(running.job_id in name for _, name in planned)
        assert (_prefix() / "jobs" / done.job_id).exists()

        removed = ascend_cli("gc", "--older-than", "1s")
        assert {(r["kind"], r["name"]) for r in removed.json} == planned
        assert sum(r["bytes"] for r in removed.json) > 3000
        assert not (_prefix() / "jobs" / done.job_id).exists()
        assert not list((_prefix() / "blobs" / "sha256").iterdir())
        assert (_prefix() / "jobs" / running.job_id / "meta.json").exists()
    finally:
        release.touch()
    assert running.result(timeout=60) == "released"


def test_gc_keeps_everything_younger_than_the_cutoff() -> None:
    assert double(1).result(timeout=60) == 2
    assert ascend_cli("gc", "--dry-run").json == []


def test_init_writes_the_user_config_that_later_commands_read(tmp_path: Path) -> None:
    storage = (tmp_path / "store").as_uri()
    done = ascend_cli(
        "--backend",
        "local",
        "--storage",
        storage,
        "--project",
        "vision",
        "init",
        "--image",
        "registry.example/runner:1",
    )
    assert done.exit_code == 0, done.stderr
    written = tomllib.loads(_config.user_config_path().read_text())
    assert written == {
        "backend": "local",
        "storage": storage,
        "project": "vision",
        "image": "registry.example/runner:1",
    }
    _config.reset()
    assert ascend.configure().storage == storage
    again = ascend_cli("--backend", "local", "init")
    assert again.exit_code == 1 and "--force" in again.stderr


def test_init_without_settings_and_without_a_terminal_is_a_usage_error() -> None:
    done = ascend_cli("init")  # stdin is not a terminal here: nothing to ask
    assert done.exit_code == 2
    assert "nothing to write" in done.stderr and "--storage" in done.stderr
    assert not _config.user_config_path().exists()


def test_init_refuses_an_invalid_setting_and_writes_nothing() -> None:
    done = ascend_cli("--project", "Not A Name", "init")
    assert done.exit_code == 1
    assert "project" in done.stderr
    assert not _config.user_config_path().exists()


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ASCEND_STORAGE", (tmp_path / "from-env").as_uri())
    flag = (tmp_path / "from-flag").as_uri()
    status = ascend_cli("--storage", flag, "doctor", "--no-job")
    assert status.exit_code == 0, status.stdout
    assert flag in next(c for c in status.json if c["name"] == "storage")["detail"]


def test_doctor_fails_on_a_storage_url_without_a_filesystem() -> None:
    done = ascend_cli("--storage", "nosuchfs://bucket/x", "doctor", "--no-job")
    assert done.exit_code == 1
    storage = next(c for c in done.json if c["name"] == "storage")
    assert storage["ok"] is False and "nosuchfs" in storage["detail"]


def test_doctor_runs_a_tiny_call_on_the_local_backend() -> None:
    done = ascend_cli("doctor")
    assert done.exit_code == 0, done.stdout
    assert next(c for c in done.json if c["name"] == "runner job")["ok"] is True
    assert ascend_cli("jobs", "list").json == []  # the probe call leaves no job behind


def test_doctor_says_how_to_fix_a_bad_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCEND_DETACH", "maybe")
    done = ascend_cli("doctor", "--no-job")
    assert done.exit_code == 1
    settings = next(c for c in done.json if c["name"] == "settings")
    assert "ASCEND_DETACH" in settings["detail"]
    assert settings["fix"].startswith("fix the setting the detail names (its flag")


def test_commands_that_need_kubernetes_say_so() -> None:
    done = ascend_cli("admin", "reaper")
    assert done.exit_code == 1
    assert "--backend kubernetes" in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "list", "--status", "sleeping"],
        ["jobs", "list", "--since", "yesterday"],
        ["gc", "--older-than", "soon"],
        ["jobs", "nosuchverb"],
        ["--output", "yaml", "jobs", "list"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    assert ascend_cli(*argv, output_json=False).exit_code == 2


def test_the_console_script_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ascend._cli", "--output", "json", "jobs", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ASCEND_STORAGE": ascend.configure().storage},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("[")


def test_an_unreachable_store_exits_1_naming_it() -> None:
    done = ascend_cli("--storage", "nosuchfs://bucket/x", "jobs", "list")
    assert done.exit_code == 1
    assert "nosuchfs" in done.stderr and "Fix" in done.stderr


def test_init_with_project_file_appends_tool_ascend_to_pyproject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "demo"\n')
    done = ascend_cli(
        "--project", "vision", "init", "--project-file", "--storage-options", '{"anon": true}'
    )
    assert done.exit_code == 0, done.stderr
    table = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    assert table["project"] == {"name": "demo"}
    assert table["tool"]["ascend"] == {"project": "vision", "storage_options": {"anon": True}}
    _config.reset()
    assert ascend.configure().project == "vision"
    again = ascend_cli("--project", "other", "init", "--project-file")
    assert again.exit_code == 1, "never a second table"
