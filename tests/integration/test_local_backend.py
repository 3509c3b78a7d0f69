"""The local backend end to end: real runner subprocesses, real files."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import ascend
from ascend_runner import protocol


class CustomError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def _refuse(*args: object) -> Exception:
    raise RuntimeError("this exception cannot be rebuilt outside the runner")


class Unloadable(Exception):
    def __reduce__(self):  # type: ignore[override]
        return (_refuse, (str(self),))


@ascend.remote
def add(a: int, b: int) -> int:
    return a + b


@ascend.remote
def fail_with(kind: str) -> None:
    if kind == "zero":
        1 / 0  # noqa: B018
    if kind == "custom":
        raise CustomError(7, "custom detail")
    if kind == "unloadable":
        raise Unloadable("remote-only message")
    if kind == "exit":
        raise SystemExit(3)


@ascend.remote
def sleeper(seconds: float) -> str:
    print(os.getpid(), flush=True)
    time.sleep(seconds)
    return "woke"


def _first_line(fut: ascend.Future) -> str:
    return next(iter(fut.logs()))


def _assert_gone(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    try:
        proc.wait(timeout=15)
    except psutil.TimeoutExpired:
        pytest.fail(f"process {pid} is still running ({proc.status()})")


def test_value_round_trips_through_the_runner() -> None:
    assert add(2, 3).result(timeout=60) == 5


def test_exception_is_reraised_as_its_own_type_with_remote_traceback() -> None:
    fut = fail_with("zero")
    with pytest.raises(ZeroDivisionError) as info:
        fut.result(timeout=60)
    cause = info.value.__cause__
    assert cause is not None and "1 / 0" in str(cause) and "fail_with" in str(cause)
    assert any("raised remotely" in note for note in info.value.__notes__)


def test_custom_exception_class_is_caught_by_except_with_its_attributes() -> None:
    try:
        fail_with("custom").result(timeout=60)
    except CustomError as exc:
        assert exc.code == 7 and exc.detail == "custom detail"
    else:
        pytest.fail("CustomError was not raised")


def test_exception_that_cannot_be_unpickled_arrives_as_remote_error() -> None:
    with pytest.raises(ascend.RemoteError) as info:
        fail_with("unloadable").result(timeout=60)
    assert info.value.type_name.endswith("Unloadable")
    assert info.value.message == "remote-only message"
    assert "raise Unloadable" in info.value.remote_traceback


def test_system_exit_in_the_function_does_not_exit_the_caller() -> None:
    with pytest.raises(ascend.RemoteError, match="SystemExit"):
        fail_with("exit").result(timeout=60)


def test_timeout_raises_deadline_exceeded_and_kills_the_process() -> None:
    fut = sleeper.options(timeout=2)(600)
    pid = int(_first_line(fut))
    with pytest.raises(ascend.DeadlineExceeded, match="timeout of 2 s"):
        fut.result(timeout=60)
    with pytest.raises(ascend.DeadlineExceeded):  # not a TimeoutError: waiting again
        fut.result(timeout=1)  # would give the same answer, not more time
    _assert_gone(pid)


def test_cancel_stops_the_remote_process() -> None:
    fut = sleeper(600)
    pid = int(_first_line(fut))
    assert fut.running()
    assert fut.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result(timeout=5)
    _assert_gone(pid)


def test_cancelling_an_awaiting_task_raises_asyncio_cancelled_and_stops_the_process() -> None:
    async def main() -> int:
        fut = sleeper(600)
        pid = int(await asyncio.to_thread(_first_line, fut))
        task = asyncio.ensure_future(fut)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fut.cancelled()
        return pid

    _assert_gone(asyncio.run(main()))


def test_output_lines_arrive_while_the_call_runs(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    @ascend.remote
    def waits_for_gate(path: str) -> str:
        print("before gate", flush=True)
        while not os.path.exists(path):
            time.sleep(0.02)
        print("after gate")
        return "done"

    fut = waits_for_gate(str(gate))
    lines = iter(fut.logs())
    assert next(lines) == "before gate"
    assert not fut.done(), "the line must arrive before the call finishes"
    gate.touch()
    assert fut.result(timeout=60) == "done"
    assert list(fut.logs()) == ["before gate", "after gate"]


def test_streamed_lines_are_printed_with_the_job_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    ascend.configure(stream_logs=True)

    @ascend.remote
    def talk() -> None:
        print("hello from remote")

    fut = talk()
    fut.result(timeout=60)
    assert f"[{fut.job_id}] hello from remote" in capsys.readouterr().out


def test_crash_is_retried_when_retries_allow(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"

    @ascend.remote(retries=1)
    def crash_once(path: str) -> str:
        if not os.path.exists(path):
            open(path, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return "second attempt"

    assert crash_once(str(marker)).result(timeout=60) == "second attempt"
    marker.unlink()
    with pytest.raises(ascend.WorkerFailed, match="SIGKILL") as info:
        crash_once.options(retries=0)(str(marker)).result(timeout=60)
    assert info.value.exit_code == 137


def test_user_exception_is_not_retried(tmp_path: Path) -> None:
    counter = tmp_path / "attempts"

    @ascend.remote(retries=3)
    def always_raises(path: str) -> None:
        with open(path, "a") as f:
            f.write("x")
        raise ValueError("deterministic")

    with pytest.raises(ValueError, match="deterministic"):
        always_raises(str(counter)).result(timeout=60)
    assert counter.read_text() == "x"


@pytest.mark.slow
def test_thousand_item_map_keeps_order_and_reports_every_failure() -> None:
    @ascend.remote
    def check(x: int) -> int:
        if x % 97 == 0:
            raise ValueError(f"bad {x}")
        return 2 * x

    results = check.map(range(1000), return_exceptions=True).result(timeout=300)
    assert len(results) == 1000
    for x, value in enumerate(results):
        if x % 97 == 0:
            assert isinstance(value, ValueError) and str(value) == f"bad {x}"
        else:
            assert value == 2 * x


def test_map_without_return_exceptions_raises_the_first_failure_with_its_index() -> None:
    @ascend.remote
    def check(x: int) -> int:
        if x == 3:
            raise KeyError(x)
        return x

    with pytest.raises(KeyError) as info:
        check.map(range(8), chunksize=1).result(timeout=120)
    assert any("item 3" in note for note in info.value.__notes__)


def test_map_iterates_in_input_order_and_starmap_unpacks_tuples() -> None:
    mf = add.map([1, 2, 3], [10, 20, 30], chunksize=1)
    assert list(mf) == [11, 22, 33]
    assert add.starmap([(1, 1), (2, 2)]).result(timeout=60) == [2, 4]
    assert add.map([]).result() == []

    async def main() -> list[int]:
        return [r async for r in add.map([5, 6], [1, 1])]

    assert asyncio.run(main()) == [6, 7]


def test_map_reports_progress_to_a_callback() -> None:
    seen: list[ascend.Progress] = []
    add.map(range(20), range(20), chunksize=5, progress=seen.append).result(timeout=120)
    assert seen[-1].done == 20 and seen[-1].failed == 0 and seen[-1].pending == 0
    assert any(p.running > 0 for p in seen)


def test_helper_module_from_a_temporary_folder_is_shipped_by_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ascend_test_helper_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import ascend_test_helper_mod  # type: ignore[import-not-found]

    @ascend.remote
    def use_helper(x: int) -> tuple[int, bool]:
        import sys as remote_sys

        return ascend_test_helper_mod.triple(x), str(tmp_path) in remote_sys.path

    value, helper_dir_on_path = use_helper(5).result(timeout=60)
    assert value == 15
    assert not helper_dir_on_path, "the runner must not be able to import the helper by name"


def test_package_made_by_another_python_is_refused_with_both_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = protocol.runtime_versions()
    monkeypatch.setattr(protocol, "runtime_versions", lambda: {**real, "python": "3.99"})
    with pytest.raises(ascend.VersionMismatch) as info:
        add(1, 2).result(timeout=60)
    message = str(info.value)
    assert "Python 3.99" in message and f"Python {real['python']}" in message
    assert real["cloudpickle"] in message and "Fix:" in message


def test_unpicklable_argument_fails_at_the_call_site() -> None:
    with pytest.raises(ascend.SerializationError, match="cannot be pickled"):
        add(threading.Lock(), 1)


def test_large_arrays_and_bytes_round_trip() -> None:
    @ascend.remote
    def double(a: np.ndarray, b: bytes) -> tuple[np.ndarray, bytes]:
        return a * 2, b + b

    array = np.random.default_rng(0).random(2_000_000)
    blob = os.urandom(3 * 2**20)
    doubled, twice = double(array, blob).result(timeout=60)
    np.testing.assert_array_equal(doubled, array * 2)
    assert twice == blob + blob


def test_many_threads_submit_and_wait_at_once() -> None:
    def worker(i: int) -> list[int]:
        return [add(i, j).result(timeout=120) for j in range(3)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    assert results == [[i + j for j in range(3)] for i in range(8)]


def test_async_callers_gather_without_blocking_their_loop() -> None:
    async def main() -> tuple[list[int], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        values = await asyncio.gather(*(add(i, i) for i in range(4)))
        tick_task.cancel()
        return values, ticks

    values, ticks = asyncio.run(main())
    assert values == [0, 2, 4, 6]
    assert ticks > 0, "the caller's loop kept running while the calls ran"


def test_memory_storage_is_refused_by_the_local_backend() -> None:
    ascend.configure(storage="memory://ascend-test")
    with pytest.raises(ascend.AscendError, match="inside this process"):
        add(1, 1).result(timeout=60)


def test_job_folder_has_the_documented_layout(isolated_ascend: Path) -> None:
    import json

    fut = add(1, 1)
    fut.result(timeout=60)
    settings = ascend.configure()
    folder = Path(settings.user_prefix.removeprefix("file://")) / "jobs" / fut.job_id
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json",
        "package.pkl",
        "result.pkl",
        "runner-0.json",
    ]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["function"].endswith("add") and meta["kind"] == "call"
    assert meta["client"]["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert meta["hashes"]["package.pkl"].startswith("sha256:")


def test_cancelling_right_after_submitting_leaves_no_process_behind() -> None:
    futures = []
    for i in range(30):  # cancel at different moments of the process start
        fut = sleeper(600)
        time.sleep(i * 0.002)
        fut.cancel()
        futures.append(fut)
    ascend.wait(futures, timeout=60)
    runners = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "ascend_runner" in " ".join(child.cmdline()):
                runners.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue  # already exited: a zombie waits only to be reaped
    _gone, alive = psutil.wait_procs(runners, timeout=15)
    assert not alive, "a cancel that raced the process start left the process running"


def test_attach_returns_the_published_result_of_an_earlier_call() -> None:
    fut = add(40, 2)
    fut.result(timeout=60)
    again = ascend.Future.attach(fut.job_id)
    assert again.result(timeout=60) == 42
    with pytest.raises(ascend.AscendError, match="no job 'add-nope'"):
        ascend.Future.attach("add-nope").result(timeout=60)


def test_a_retry_is_announced_in_a_sentence_naming_the_call_and_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "crashed-once"

    @ascend.remote(retries=1)
    def crash_once(path: str) -> str:
        if not os.path.exists(path):
            open(path, "w").close()
            os._exit(3)
        return "second attempt"

    caplog.set_level("WARNING", logger="ascend")
    fut = crash_once(str(marker))
    assert fut.result(timeout=60) == "second attempt"
    [message] = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert message.startswith("attempt 1 of 2 failed; retrying. ")
    assert f"(job {fut.job_id}) failed with exit code 3" in message
    assert "event=" not in message


def test_a_cancelled_calls_error_says_which_call_and_why(tmp_path: Path) -> None:
    @ascend.remote
    def wait_for(path: str) -> None:
        while not os.path.exists(path):
            time.sleep(0.05)

    fut = wait_for(str(tmp_path / "never"))
    fut.cancel()
    with pytest.raises(concurrent.futures.CancelledError) as info:
        fut.result(timeout=60)
    assert str(info.value).endswith(
        f"wait_for (job {fut.job_id}) was cancelled by fut.cancel() (or Ctrl-C while waiting "
        "for it)."
    )

    @ascend.remote
    def fails_first(x: int) -> None:
        if x == 0:
            raise KeyError(x)
        time.sleep(30)

    mf = fails_first.map([0, 1], chunksize=1)
    with pytest.raises(KeyError):
        mf.result(timeout=60)
    with pytest.raises(concurrent.futures.CancelledError) as item:
        mf.futures[1].result(timeout=60)
    assert "because item 0 of its map failed first (KeyError)" in str(item.value)
