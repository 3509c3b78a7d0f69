"""Contract: user code never runs on ascend's loop thread, and futures are asyncio's too.

Done-callbacks, progress callbacks and the printing of streamed output run off the
scheduler loop, so they may block (even wait for another call) without stalling every
call in the process. A blocking wait on the loop thread is refused with a clear error;
one inside a running event loop warns once. The asyncio functions people reach for
accept ascend futures as they accept asyncio's own.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import time
import warnings
from typing import Any

import pytest
from blockbuster import BlockBuster

import ascend
from ascend import _bridge
from ascend._scheduler import get_scheduler

_WAIT = 120  # seconds any one call may take on a slow backend (a pod start)


@ascend.remote
def _double(x: int) -> int:
    return 2 * x


@ascend.remote
def _nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@ascend.remote
def _chatty(lines: int) -> int:
    for i in range(lines):
        print(f"line {i}", flush=True)
    return lines


def test_a_done_callback_may_wait_for_another_call(backend: str) -> None:
    results: list[int] = []
    finished = threading.Event()

    def chain(fut: ascend.Future[int]) -> None:
        results.append(_double(fut.result()).result(timeout=_WAIT))
        finished.set()

    _double(1).add_done_callback(chain)
    assert finished.wait(2 * _WAIT), "the callback's own call never finished"
    assert results == [4]
    assert _double(5).result(timeout=_WAIT) == 10, "other calls go on meanwhile"


def test_done_callbacks_run_off_the_scheduler_loop_thread(backend: str) -> None:
    threads: list[str] = []
    done = threading.Event()
    fut = _double(2)
    fut.add_done_callback(lambda f: (threads.append(threading.current_thread().name), done.set()))
    assert fut.result(timeout=_WAIT) == 4
    assert done.wait(10)
    assert threads and threads[0] != "ascend-scheduler"


def test_a_blocking_callback_does_not_stall_other_calls(backend: str) -> None:
    release = threading.Event()
    blocked = _double(1)
    blocked.add_done_callback(lambda f: release.wait(60))
    try:
        blocked.result(timeout=_WAIT)
        assert _double(3).result(timeout=_WAIT) == 6
    finally:
        release.set()


def test_progress_callbacks_run_off_the_scheduler_loop_thread(backend: str) -> None:
    threads: set[str] = set()
    _double.map(range(3), progress=lambda p: threads.add(threading.current_thread().name)).result(
        timeout=_WAIT
    )
    assert threads and "ascend-scheduler" not in threads


def test_a_blocked_terminal_does_not_stall_other_calls(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streamed output is printed off the loop: a stdout that blocks holds up only
    printing, never the calls themselves."""
    release = threading.Event()

    class StuckTerminal(io.StringIO):
        def write(self, text: str) -> int:
            release.wait(60)
            return super().write(text)

    ascend.configure(stream_logs=True)
    monkeypatch.setattr(sys, "stdout", StuckTerminal())
    try:
        chatty = _chatty(5)
        assert _double(4).result(timeout=_WAIT) == 8
        assert chatty.exception(timeout=_WAIT) is None
    finally:
        release.set()
        _bridge.output.drain(10)


def test_a_blocking_wait_on_the_scheduler_loop_raises_instead_of_stalling(backend: str) -> None:
    fut = _nap(30)
    try:
        loop = get_scheduler()._loop
        assert loop is not None

        async def wait_on_the_loop() -> Any:
            return fut.result()

        with pytest.raises(ascend.BlockingWaitError, match="scheduler loop thread"):
            asyncio.run_coroutine_threadsafe(wait_on_the_loop(), loop).result(timeout=10)
    finally:
        fut.cancel()


def test_result_inside_a_running_event_loop_warns_once_naming_await(
    backend: str, monkeypatch: pytest.MonkeyPatch, blockbuster: BlockBuster
) -> None:
    blockbuster.deactivate()  # blocking the loop is what this test does on purpose
    monkeypatch.setattr(_bridge, "_warned", False)

    async def main() -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _double(1).result(timeout=_WAIT) == 2
            assert _double(2).result(timeout=_WAIT) == 4
        return caught

    caught = [w for w in asyncio.run(main()) if issubclass(w.category, RuntimeWarning)]
    assert len(caught) == 1
    assert "await" in str(caught[0].message)


def test_attach_inside_a_running_event_loop_warns_with_advice_that_fits_attach(
    backend: str, monkeypatch: pytest.MonkeyPatch, blockbuster: BlockBuster
) -> None:
    """There is no future to await yet: the advice is a worker thread, not `await fut`."""
    blockbuster.deactivate()
    first = _double(5)
    assert first.result(timeout=_WAIT) == 10  # the local backend attaches to finished jobs
    job_id = first.job_id
    monkeypatch.setattr(_bridge, "_warned", False)

    async def main() -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = ascend.Future.attach(job_id)
        assert await asyncio.to_thread(again.result, _WAIT) == 10
        return caught

    [warning] = [w for w in asyncio.run(main()) if issubclass(w.category, RuntimeWarning)]
    assert "asyncio.to_thread(ascend.Future.attach, job_id)" in str(warning.message)
    assert "await fut" not in str(warning.message)


def test_asyncio_wait_accepts_ascend_futures(backend: str) -> None:
    async def main() -> set[int]:
        done, pending = await asyncio.wait([_double(1), _double(2)], timeout=_WAIT)
        assert not pending
        return {f.result() for f in done}

    assert asyncio.run(main()) == {2, 4}


def test_asyncio_wait_first_completed_returns_the_first(backend: str) -> None:
    async def main() -> None:
        slow, fast = _nap(60), _double(3)
        try:
            done, pending = await asyncio.wait(
                [slow, fast], timeout=_WAIT, return_when=asyncio.FIRST_COMPLETED
            )
            assert done == {fast} and pending == {slow}
        finally:
            slow.cancel()

    asyncio.run(main())


def test_asyncio_as_completed_accepts_ascend_futures(backend: str) -> None:
    async def main() -> list[int]:
        return sorted([await f for f in asyncio.as_completed([_double(1), _double(2)])])

    assert asyncio.run(main()) == [2, 4]


def test_asyncio_gather_accepts_ascend_futures(backend: str) -> None:
    async def main() -> list[int]:
        return await asyncio.gather(_double(1), _double(2))

    assert asyncio.run(main()) == [2, 4]


def test_asyncio_wait_for_timeout_cancels_the_call(backend: str) -> None:
    fut = _nap(60)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fut, timeout=0.5)

    asyncio.run(main())
    assert fut.cancelled()


def test_asyncio_timeout_cancels_the_call(backend: str) -> None:
    fut = _nap(60)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await fut

    asyncio.run(main())
    assert fut.cancelled()


def test_asyncio_shield_keeps_the_call_running_when_the_waiter_is_cancelled(
    backend: str,
) -> None:
    fut = _nap(2)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fut), timeout=0.2)

    asyncio.run(main())
    assert not fut.cancelled()
    assert fut.result(timeout=_WAIT) == 2


def test_an_ascend_future_can_be_awaited_from_two_event_loops(backend: str) -> None:
    fut = _nap(1)
    results: list[float] = []

    def await_in_own_loop() -> None:
        async def main() -> float:
            return await fut

        results.append(asyncio.run(main()))

    threads = [threading.Thread(target=await_in_own_loop) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(_WAIT)
    assert results == [1, 1]
