"""Contract: a runner that dies reads the same on every backend (one diagnosis), and a
call nobody disrupted reports no preemptions."""

from __future__ import annotations

import os

import pytest

import ascend


@ascend.remote
def _crash(code: int) -> None:
    print("about to exit", flush=True)
    os._exit(code)


@ascend.remote
def _double(x: int) -> int:
    return 2 * x


def test_a_crash_is_worker_failed_with_its_exit_code(backend: str) -> None:
    # (Its last output is not asserted: in pods, the runner's copy of fds 1 and 2 goes
    # through a pipe that os._exit can cut before the last bytes are written through.)
    fut = _crash(3)
    with pytest.raises(ascend.WorkerFailed) as caught:
        fut.result(timeout=120)
    assert caught.value.exit_code == 3
    assert "failed with exit code 3" in str(caught.value)
    assert not isinstance(caught.value, ascend.OOMKilled | ascend.Preempted)


def test_a_timeout_reads_the_same_on_every_backend(backend: str) -> None:
    import time

    @ascend.remote(timeout=1)
    def slow() -> None:
        time.sleep(60)

    with pytest.raises(ascend.DeadlineExceeded, match=r"ran past its timeout of 1 s per call"):
        slow().result(timeout=120)


def test_an_undisturbed_call_reports_no_preemptions(backend: str) -> None:
    fut = _double(4)
    assert fut.result(timeout=120) == 8
    assert fut.preemptions == 0
