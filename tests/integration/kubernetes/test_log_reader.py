"""The pods/log reader against the real test cluster: streams that end mid-line."""

from __future__ import annotations

import sys
import time

import pytest

import ascend
from tests.cluster.fixtures_k8s import K8sCluster
from tests.cluster.shared import Shared

pytestmark = pytest.mark.k8s

HALF = 40_000  # more than the 16 KiB record the container runtime writes at once


@pytest.fixture
def on_cluster(on_cluster: K8sCluster) -> K8sCluster:
    """The shared configuration for the test cluster, with this module's settings."""
    ascend.configure(
        stream_logs=True,
    )
    return on_cluster


@ascend.remote
def _half_a_line_then_wait(gate: Shared) -> str:
    sys.stdout.write("a" * HALF)
    sys.stdout.flush()
    deadline = time.monotonic() + 60
    while not gate.exists("gate") and time.monotonic() < deadline:
        time.sleep(0.1)
    sys.stdout.write("b" * HALF + "\n")
    print("next line")
    return "done"


def test_a_line_cut_off_by_the_end_of_a_stream_arrives_once_and_whole(
    on_cluster: K8sCluster,
    shared: Shared,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ascend.backends._kubernetes import _logs  # needs the kubernetes extra

    # Streams end after a second of silence: the first ends after half of the long line.
    monkeypatch.setattr(_logs, "LOG_READ_TIMEOUT", 1.0)
    fut = _half_a_line_then_wait(shared)
    while fut.status != "running":
        time.sleep(0.05)
    time.sleep(4)  # a few streams end during the pause
    shared.touch("gate")
    assert fut.result(timeout=120) == "done"
    whole = "a" * HALF + "b" * HALF
    assert list(fut.logs()) == [whole, "next line"]
    printed = [x for x in capsys.readouterr().out.split("\n") if x.startswith(f"[{fut.job_id}]")]
    assert printed == [f"[{fut.job_id}] {whole}", f"[{fut.job_id}] next line"]
