"""``ascend jobs`` and ``ascend gc`` against real Jobs on the test cluster."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest

import ascend
from tests.cluster.fixtures_k8s import K8sCluster, wait_until
from tests.cluster.k8s_helpers import listed
from tests.integration.cli.conftest import ascend_cli

pytestmark = [pytest.mark.k8s, pytest.mark.usefixtures("clean_jobs")]


@ascend.remote
def greet(name: str) -> str:
    print(f"hello {name}", flush=True)
    return f"hi {name}"


@ascend.remote
def square(x: int) -> int:
    print(f"squaring {x}", flush=True)
    if x == 2:
        raise ValueError("two is not allowed")
    return x * x


@ascend.remote
def slow(seconds: float) -> str:
    import time

    for i in range(int(seconds)):
        print(f"tick {i}", flush=True)
        time.sleep(1)
    return "done"


@pytest.fixture
def on_cluster(on_cluster: K8sCluster) -> K8sCluster:
    """The shared configuration for the test cluster, with this module's settings."""
    ascend.configure(
        user=f"cli-{uuid.uuid4().hex[:8]}",
    )
    return on_cluster


def _rows() -> dict[str, dict]:
    done = ascend_cli("jobs", "list")
    assert done.exit_code == 0, done.stderr
    return {r["job_id"]: r for r in done.json}


def test_list_shows_calls_and_maps_with_their_state_and_counts(on_cluster: K8sCluster) -> None:
    call = greet("ada")
    assert call.result(timeout=120) == "hi ada"
    mapped = square.map(range(4), return_exceptions=True)
    assert list(mapped)[3] == 9
    rows = wait_until(
        lambda: (r := _rows())[mapped.job_id]["done"] + r[mapped.job_id]["failed"] == 4 and r,
        30,
        "the map's Job to count every item",
    )
    assert rows[call.job_id]["state"] == "succeeded"
    assert rows[call.job_id]["kind"] == "call"
    assert rows[call.job_id]["function"] == "greet"
    m = rows[mapped.job_id]
    assert (m["kind"], m["items"], m["state"], m["done"], m["failed"]) == ("map", 4, "failed", 3, 1)
    assert next(iter(rows)) == mapped.job_id, "newest first"

    only_calls = ascend_cli("jobs", "list", "--function", "greet").json
    assert [r["job_id"] for r in only_calls] == [call.job_id]
    assert ascend_cli("jobs", "list", "--status", "running").json == []
    recent = {r["job_id"] for r in ascend_cli("jobs", "list", "--since", "1h").json}
    assert {call.job_id, mapped.job_id} <= recent


def test_a_chunked_maps_counts_are_of_items_not_of_its_jobs_indexes(
    on_cluster: K8sCluster,
) -> None:
    mapped = square.map(range(4), chunksize=2, return_exceptions=True)  # 2 indexes
    assert isinstance(list(mapped)[2], ValueError)
    status = wait_until(
        lambda: (
            (s := ascend_cli("jobs", "status", mapped.job_id).json)["state"]
            not in ("pending", "running")
            and s
        ),
        30,
        "the map's Job to end",
    )
    assert (status["state"], status["done"], status["failed"]) == ("failed", 3, 1)


def test_status_logs_and_result_of_a_finished_call(on_cluster: K8sCluster, tmp_path: Path) -> None:
    call = greet("bo")
    call.result(timeout=120)
    status = ascend_cli("jobs", "status", call.job_id).json
    assert status["state"] == "succeeded" and status["meta"]["function"] == "greet"
    logs = ascend_cli("jobs", "logs", call.job_id, output_json=False)
    assert logs.exit_code == 0 and "hello bo" in logs.stdout.splitlines()
    out = tmp_path / "value.pkl"
    result = ascend_cli("jobs", "result", call.job_id, "--save", str(out))
    assert result.json["value"] == "hi bo"
    assert pickle.loads(out.read_bytes()) == "hi bo"


def test_logs_of_a_finished_call_come_from_storage_once_its_job_is_gone(
    on_cluster: K8sCluster,
) -> None:
    call = greet("cy")
    call.result(timeout=120)
    on_cluster.kubectl("delete", "job", call.job_id, "-n", on_cluster.namespace, "--wait=true")
    logs = ascend_cli("jobs", "logs", call.job_id, output_json=False)
    assert logs.exit_code == 0, logs.stderr
    assert "hello cy" in logs.stdout.splitlines()
    assert ascend_cli("jobs", "status", call.job_id).json["state"] == "succeeded"


def test_result_of_a_map_lists_values_and_errors(on_cluster: K8sCluster) -> None:
    mapped = square.map(range(3), return_exceptions=True)
    list(mapped)
    value = ascend_cli("jobs", "result", mapped.job_id).json["value"]
    assert value[:2] == [0, 1]
    assert "two is not allowed" in value[2]
    logs = ascend_cli("jobs", "logs", mapped.job_id, output_json=False)
    assert {f"squaring {i}" for i in range(3)} <= set(logs.stdout.splitlines())


def test_result_of_a_call_that_raised_exits_1_naming_the_error(on_cluster: K8sCluster) -> None:
    fut = square(2)
    with pytest.raises(ValueError, match="two is not allowed"):
        fut.result(timeout=120)
    done = ascend_cli("jobs", "result", fut.job_id)
    assert done.exit_code == 1
    assert done.json["error"] == "ValueError: two is not allowed"
    assert ascend_cli("jobs", "status", fut.job_id).json["state"] == "failed"


def _cli_in_another_process(*args: str) -> subprocess.CompletedProcess[str]:
    """``ascend ARGS`` in another process, as a user would run it (the console script's
    module), with this test's settings as flags."""
    s = ascend.configure()
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ascend._cli",
            "--backend",
            "kubernetes",
            "--kubeconfig",
            str(s.kubeconfig),
            "--namespace",
            str(s.namespace),
            "--storage",
            s.storage,
            "--user",
            s.user,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        # The store's options (its endpoint) have no flag: the environment carries them.
        env={**os.environ, "ASCEND_STORAGE_OPTIONS": json.dumps(dict(s.storage_options))},
    )


def test_follow_prints_a_running_calls_output_until_it_ends(on_cluster: K8sCluster) -> None:
    fut = slow(12)  # well past the command's start on a busy machine
    wait_until(lambda: fut.running(), 60, "the call to run")
    logs = _cli_in_another_process("jobs", "logs", "-f", fut.job_id)
    assert logs.returncode == 0, logs.stderr
    assert [line for line in logs.stdout.splitlines() if line.startswith("tick")] == [
        f"tick {i}" for i in range(12)
    ]
    assert fut.result(timeout=60) == "done"


def test_follow_prints_each_map_items_output_with_its_prefix(on_cluster: K8sCluster) -> None:
    mapped = slow.map([12, 13])  # well past the command's start on a busy machine
    wait_until(lambda: all(f.running() for f in mapped.futures), 60, "the items to run")
    logs = _cli_in_another_process("jobs", "logs", "-f", mapped.job_id)
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    for item, ticks in ((0, 12), (1, 13)):
        mine = [line.split("] ", 1)[1] for line in lines if f"#{item}]" in line]
        assert mine, logs.stdout + logs.stderr
        assert [t for t in mine if t.startswith("tick")][-ticks:] == [
            f"tick {i}" for i in range(ticks)
        ]
    assert list(mapped) == ["done", "done"]


def test_cancel_deletes_a_running_job(on_cluster: K8sCluster) -> None:
    fut = slow(120)
    wait_until(lambda: fut.running(), 60, "the call to run")
    assert _rows()[fut.job_id]["state"] == "running"
    done = ascend_cli("jobs", "cancel", fut.job_id)
    assert done.exit_code == 0 and done.json["cancelled"] is True
    with pytest.raises(ascend.WorkerFailed, match="deleted"):
        fut.result(timeout=60)
    assert ascend_cli("jobs", "cancel", fut.job_id).exit_code == 1, "nothing left to cancel"
    wait_until(
        lambda: ascend_cli("jobs", "status", fut.job_id).json["state"] == "cancelled",
        30,
        "the cancelled job to show as cancelled",
    )
    cancelled = ascend_cli("jobs", "list", "--status", "cancelled").json
    assert [r["job_id"] for r in cancelled] == [fut.job_id]


def test_unknown_job_id_exits_1_and_says_how_to_find_it(on_cluster: K8sCluster) -> None:
    done = ascend_cli("jobs", "status", "nothing-0000000000")
    assert done.exit_code == 1
    assert "ascend jobs list" in done.stderr


def test_a_bad_flag_is_a_usage_error(on_cluster: K8sCluster) -> None:
    assert ascend_cli("jobs", "list", "--status", "sleeping").exit_code == 2
    assert ascend_cli("gc", "--older-than", "soon").exit_code == 2


def test_gc_dry_run_lists_exactly_what_gc_removes_and_never_a_running_job(
    on_cluster: K8sCluster,
) -> None:
    big = b"x" * (2 << 20)  # a blob, stored once by content

    @ascend.remote
    def size(data: bytes) -> int:
        return len(data)

    finished = size(big)
    assert finished.result(timeout=120) == len(big)
    mapped = square.map(range(2), return_exceptions=True)
    list(mapped)

    def marked_finished(job_id: str) -> bool:
        # A published result resolves the future before the Job controller marks the
        # Job; until it does, gc counts the Job as running and keeps it.
        conditions = on_cluster.get("job", job_id).get("status", {}).get("conditions") or []
        return any(
            c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in conditions
        )

    for job_id in (finished.job_id, mapped.job_id):
        wait_until(lambda job_id=job_id: marked_finished(job_id), 60, "the Job to be marked")
    running = slow(120)
    wait_until(lambda: running.running(), 60, "the call to run")
    settings = ascend.configure()
    fs, root = fsspec.core.url_to_fs(settings.user_prefix, **dict(settings.storage_options))

    def stored(path: str) -> bool:  # the store as it is now (no cached listing)
        fs.invalidate_cache()
        return bool(fs.exists(f"{root}/{path}"))

    time.sleep(1.5)

    dry = ascend_cli("gc", "--older-than", "1s", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    planned = {(r["kind"], r["name"]) for r in dry.json}
    names = " ".join(name for _, name in planned)
    assert running.job_id not in names, "a running job's files are never removed"
    assert finished.job_id in names and mapped.job_id in names
    assert any(kind == "blob" for kind, _ in planned)
    assert all(r["removed"] is False for r in dry.json)
    assert stored(f"jobs/{finished.job_id}"), "a dry run removes nothing"

    done = ascend_cli("gc", "--older-than", "1s")
    assert {(r["kind"], r["name"]) for r in done.json} == planned
    assert not stored(f"jobs/{finished.job_id}")
    fs.invalidate_cache()
    assert not fs.find(f"{root}/blobs/sha256")
    assert stored(f"jobs/{running.job_id}/meta.json")
    jobs = listed(on_cluster, "jobs", f"ascend.dev/user={ascend.configure().user}")
    assert [j["metadata"]["name"] for j in jobs] == [running.job_id]
    assert ascend_cli("gc", "--older-than", "1s", "--dry-run").json == []
    running.cancel()
