"""Contract: a call's lifecycle — what the function sees, when it ends, how it fails.

Every backend: the runner's own variables never reach the function (so it can make
remote calls itself); a call resolves once its result is published, whatever the
function left running; a process that ends without publishing, a stopped call and an
unknown job each get an error naming that cause; a setting the backend cannot use is
refused before anything starts.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

import ascend
from ascend import _config
from ascend_runner import protocol

_WAIT = 120  # seconds any one call may take on a slow backend (a pod start)


@ascend.remote
def _runner_variables_seen() -> list[str]:
    return sorted(name for name in os.environ if name in protocol.RUNNER_ENV)


def test_the_function_sees_none_of_the_runners_own_variables(backend: str) -> None:
    assert _runner_variables_seen().result(timeout=_WAIT) == []


@ascend.remote
def _nested(storage: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    import ascend

    ascend.configure(
        backend="local",
        storage=storage,
        storage_options=storage_options,
        stream_logs=False,
        progress=False,
    )

    @ascend.remote
    def inner(x: int) -> int:
        return x + 1

    return {"call": inner(1).result(timeout=60), "map": inner.map([1, 2, 3]).result(timeout=60)}


def test_a_remote_function_can_make_remote_calls_and_maps(backend: str) -> None:
    settings = _config.current()  # the worker's storage: the same store, its own options
    nested = _nested(settings.storage, dict(settings.storage_options)).result(timeout=_WAIT)
    assert nested == {"call": 2, "map": [2, 3, 4]}


@ascend.remote
def _leave_a_child_process() -> int:
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid


def test_a_call_resolves_when_published_though_it_left_a_child_process(backend: str) -> None:
    assert _leave_a_child_process().result(timeout=_WAIT) > 0


@ascend.remote
def _leave_a_thread() -> str:
    threading.Thread(target=time.sleep, args=(600,), daemon=False).start()
    return "returned"


def test_a_call_resolves_when_published_though_it_left_a_non_daemon_thread(backend: str) -> None:
    assert _leave_a_thread().result(timeout=_WAIT) == "returned"


@ascend.remote
def _exit_without_returning() -> None:
    os._exit(0)


def test_a_process_that_exits_without_publishing_gets_an_error_naming_that(backend: str) -> None:
    with pytest.raises(ascend.ResultMissing, match=r"os\._exit"):
        _exit_without_returning().result(timeout=_WAIT)


@ascend.remote(timeout=2)
def _overrun() -> None:
    time.sleep(600)


def test_retrying_the_wait_on_timeout_ends_when_the_call_is_stopped(backend: str) -> None:
    """``except TimeoutError: wait again`` must not spin for ever on a killed call."""
    fut = _overrun()
    for _ in range(4 * _WAIT):
        try:
            fut.result(timeout=0.5)
        except TimeoutError:
            continue  # the wait ran out; the call goes on
        except ascend.DeadlineExceeded:
            break  # the call was stopped
    else:
        pytest.fail("DeadlineExceeded never came: the loop kept waiting")
    assert isinstance(fut.exception(), ascend.DeadlineExceeded)


@pytest.mark.parametrize("storage", ["memory://ascend-test"])
def test_storage_the_backend_cannot_read_is_refused_before_anything_starts(
    backend: str, storage: str
) -> None:
    before = _config.current().storage
    ascend.configure(storage=storage)
    try:
        with pytest.raises(ascend.ConfigError, match="another process"):
            _runner_variables_seen()
        with pytest.raises(ascend.ConfigError, match="another process"):
            _nested.map(["x"], [{}])
    finally:
        ascend.configure(storage=before)


def test_attaching_an_unknown_job_raises_no_such_job(backend: str) -> None:
    with pytest.raises(ascend.NoSuchJob, match="no job 'nothing-0000000000'"):
        ascend.Future.attach("nothing-0000000000").result(timeout=_WAIT)
    with pytest.raises(ascend.NoSuchJob) as info:
        ascend.MapFuture.attach("nothing-0000000001")
    assert info.value.job_id == "nothing-0000000001"
