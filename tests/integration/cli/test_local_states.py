"""What ``ascend jobs`` and ``ascend gc`` say of local jobs whose runners still run, ended
without a result or were stopped: decided from the local backend's runner records, as a
Kubernetes Job's status decides them on a cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ascend
from tests.integration.cli.conftest import ascend_cli

_DETACHED_SCRIPT = """
import os, sys, time
import ascend

ascend.configure(detach=True, stream_logs=False, progress=False)

@ascend.remote
def wait_for(path):
    while not os.path.exists(path):
        print("waiting", flush=True)
        time.sleep(0.1)
    return "released"

print(wait_for(sys.argv[1]).job_id, flush=True)
"""


def _submit_detached(tmp_path: Path, release: Path) -> str:
    """Submit a detached call from a process that exits right away; its job id."""
    script = tmp_path / "detached.py"
    script.write_text(textwrap.dedent(_DETACHED_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script), str(release)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ASCEND_STORAGE": ascend.configure().storage},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


def _state(job_id: str) -> str:
    done = ascend_cli("jobs", "status", job_id)
    assert done.exit_code == 0, done.stderr
    return str(done.json["state"])


def _wait_for_state(job_id: str, wanted: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    now = None
    while time.monotonic() < deadline:
        done = ascend_cli("jobs", "status", job_id)  # fails until its meta.json is written
        if done.exit_code == 0 and (now := done.json["state"]) == wanted:
            return
        time.sleep(0.2)
    assert now == wanted


def test_a_detached_call_whose_client_exited_is_running_while_its_runner_lives(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    job_id = _submit_detached(tmp_path, release)
    try:
        assert _state(job_id) == "running"
        row = {r["job_id"]: r for r in ascend_cli("jobs", "list").json}[job_id]
        assert row["state"] == "running"
        assert ascend_cli("jobs", "list", "--status", "cancelled").json == []
    finally:
        release.touch()
    _wait_for_state(job_id, "succeeded")


def test_jobs_cancel_stops_a_detached_local_call_and_it_is_cancelled(tmp_path: Path) -> None:
    release = tmp_path / "release"
    job_id = _submit_detached(tmp_path, release)
    done = ascend_cli("jobs", "cancel", job_id)
    assert done.exit_code == 0, done.stderr
    assert done.json == {"job_id": job_id, "cancelled": True, "units": [0]}
    assert _state(job_id) == "cancelled"
    release.touch()
    time.sleep(0.5)  # a runner that survived would publish now
    assert _state(job_id) == "cancelled"
    again = ascend_cli("jobs", "cancel", job_id)
    assert again.exit_code == 1
    assert "no running runner" in again.stderr


@ascend.remote(timeout=1)
def overruns() -> None:
    time.sleep(30)


@ascend.remote
def exits_3() -> None:
    os._exit(3)


@ascend.remote
def kills_itself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@ascend.remote
def exits_0() -> None:
    os._exit(0)


@pytest.mark.parametrize(
    ("fn", "error"),
    [
        (overruns, ascend.DeadlineExceeded),
        (exits_3, ascend.WorkerFailed),
        (kills_itself, ascend.WorkerFailed),
        (exits_0, ascend.ResultMissing),
    ],
    ids=["timeout", "exit-3", "sigkill", "no-result"],
)
@pytest.mark.parametrize("detach", [False, True], ids=["attached", "detached"])
def test_a_call_that_ended_without_a_result_is_failed(
    fn: ascend.RemoteFunction[[], None], error: type[Exception], detach: bool
) -> None:
    ascend.configure(detach=detach)
    fut = fn()
    with pytest.raises(error):
        fut.result(timeout=60)
    row = ascend_cli("jobs", "status", fut.job_id).json
    assert (row["state"], row["done"], row["failed"]) == ("failed", 0, 1)
    failed = ascend_cli("jobs", "list", "--status", "failed").json
    assert [r["job_id"] for r in failed] == [fut.job_id]
    result = ascend_cli("jobs", "result", fut.job_id)
    assert result.exit_code == 1
    assert "its runner ended without publishing one" in result.stderr
    assert "still running" not in result.stderr


@ascend.remote
def chunk_item(x: int) -> int:
    if x == 1:
        os._exit(3)
    return x


def test_a_map_item_whose_runner_crashed_counts_as_failed() -> None:
    mapped = chunk_item.map([0, 1, 2], return_exceptions=True)
    assert [type(r).__name__ for r in mapped] == ["int", "WorkerFailed", "int"]
    row = ascend_cli("jobs", "status", mapped.job_id).json
    assert (row["state"], row["done"], row["failed"]) == ("failed", 2, 1)


@ascend.remote
def wait_for(path: str) -> str:
    while not os.path.exists(path):
        time.sleep(0.05)
    return "released"


def test_a_cancelled_call_is_cancelled(tmp_path: Path) -> None:
    fut = wait_for(str(tmp_path / "never"))
    _wait_for_state(fut.job_id, "running")
    fut.cancel()
    _wait_for_state(fut.job_id, "cancelled")


def test_gc_removes_an_old_call_without_a_result_once_nothing_runs_it(tmp_path: Path) -> None:
    cancelled = wait_for(str(tmp_path / "never"))
    _wait_for_state(cancelled.job_id, "running")
    cancelled.cancel()
    _wait_for_state(cancelled.job_id, "cancelled")
    crashed = exits_3()
    with pytest.raises(ascend.WorkerFailed):
        crashed.result(timeout=60)
    release = tmp_path / "release"
    running = wait_for(str(release))
    try:
        _wait_for_state(running.job_id, "running")
        time.sleep(1.5)
        planned = ascend_cli("gc", "--older-than", "1s", "--dry-run").json
        folders = {r["name"].rsplit("/", 1)[-1] for r in planned if r["kind"] == "folder"}
        assert folders == {cancelled.job_id, crashed.job_id}
    finally:
        release.touch()
    assert running.result(timeout=60) == "released"


def test_logs_follow_prints_a_detached_local_calls_output_until_it_ends(tmp_path: Path) -> None:
    import threading

    release = tmp_path / "release"
    job_id = _submit_detached(tmp_path, release)
    threading.Timer(1.5, release.touch).start()
    done = ascend_cli("jobs", "logs", "-f", job_id, output_json=False)
    assert done.exit_code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) > 3 and set(lines) == {"waiting"}
    assert _state(job_id) == "succeeded"


def test_an_unknown_local_job_is_reported_without_kubernetes_words() -> None:
    done = ascend_cli("jobs", "status", "nope-0000000123")
    assert done.exit_code == 1
    assert "no job 'nope-0000000123': no folder under" in done.stderr
    assert "namespace" not in done.stderr
