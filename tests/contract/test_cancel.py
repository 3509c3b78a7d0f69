"""Contract: cancel means the work stops.

Cancelling one map item stops that item's remote work and leaves the others running.
Every way of waiting on a map reacts to Ctrl-C, or to the cancellation of the task that
awaits it, the same way: what it waited for is cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import ascend
from tests.cluster.shared import Shared

_WAIT = 120  # seconds any one call may take on a slow backend (a pod start)


@ascend.remote
def _beat(x: int, folder: Shared) -> int:
    """Item ``x`` writes a heartbeat file several times a second; odd items never end."""
    deadline = time.monotonic() + (600 if x % 2 else 3)
    while time.monotonic() < deadline:
        folder.touch(f"beat-{x}", str(time.monotonic_ns()))
        time.sleep(0.1)
    return x


def _beating(beats: Shared, name: str, within: float = _WAIT) -> None:
    deadline = time.monotonic() + within
    while not beats.exists(name):
        assert time.monotonic() < deadline, f"{name} never started"
        time.sleep(0.1)


def _stopped(beats: Shared, *names: str, quiet_for: float = 3.0, within: float = 30.0) -> bool:
    """True once none of the heartbeats ``names`` has changed for ``quiet_for`` seconds."""
    deadline = time.monotonic() + within
    last, since = [beats.read_text(n) for n in names], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = [beats.read_text(n) for n in names]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_for:
            return True
    return False


@pytest.fixture
def beats(shared: Shared) -> Shared:
    """Where the items' heartbeats go: a folder the workers share with this test."""
    return shared


@pytest.mark.parametrize("retries", [0, 1])
def test_cancelling_one_map_item_stops_its_work_and_not_the_others(
    backend: str, beats: Shared, retries: int
) -> None:
    """With retries left, the cancelled item is not run again either."""
    beat = _beat.options(retries=retries)
    mf = beat.map([0, 1, 2], [beats] * 3, chunksize=1, return_exceptions=True)
    _beating(beats, "beat-1")
    assert mf.futures[1].cancel()
    assert _stopped(beats, "beat-1"), "the cancelled item's work kept running"
    results = mf.result(timeout=_WAIT)
    assert results[0] == 0 and results[2] == 2, "the other items ran to the end"
    assert isinstance(results[1], concurrent.futures.CancelledError)
    assert mf.futures[1].status == "cancelled"


def test_cancelling_one_map_item_without_return_exceptions_lets_the_others_finish(
    backend: str, beats: Shared
) -> None:
    mf = _beat.map([0, 1, 2], [beats] * 3, chunksize=1)
    _beating(beats, "beat-1")
    assert mf.futures[1].cancel()
    assert _stopped(beats, "beat-1"), "the cancelled item's work kept running"
    with pytest.raises(concurrent.futures.CancelledError, match="item 1 was cancelled"):
        mf.result(timeout=_WAIT)
    assert [mf.futures[0].result(), mf.futures[2].result()] == [0, 2]


def test_iterating_a_map_with_return_exceptions_yields_a_cancelled_item_in_its_place(
    backend: str, beats: Shared
) -> None:
    mf = _beat.map([0, 1, 2], [beats] * 3, chunksize=1, return_exceptions=True)
    _beating(beats, "beat-1")
    assert mf.futures[1].cancel()
    values = list(mf)
    assert values[0] == 0 and values[2] == 2
    assert isinstance(values[1], concurrent.futures.CancelledError)


def _sync_ways() -> dict[str, Callable[[ascend.MapFuture[Any]], object]]:
    return {
        "result": lambda mf: mf.result(),
        "for": lambda mf: list(mf),
        "as_completed": lambda mf: [f.result() for f in ascend.as_completed(mf.futures)],
        "wait": lambda mf: ascend.wait(mf.futures),
    }


@pytest.mark.parametrize("return_exceptions", [False, True])
@pytest.mark.parametrize("way", sorted(_sync_ways()))
def test_ctrl_c_while_waiting_on_a_map_cancels_it_and_stops_its_work(
    backend: str, beats: Shared, way: str, return_exceptions: bool
) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.fail("Ctrl-C reaches only the main thread; run this test there")
    mf = _beat.map([1, 3], [beats] * 2, chunksize=1, return_exceptions=return_exceptions)
    _beating(beats, "beat-1")
    _beating(beats, "beat-3")
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _sync_ways()[way](mf)
    finally:
        timer.cancel()
    assert all(f.cancelled() for f in mf.futures), [f.status for f in mf.futures]
    assert _stopped(beats, "beat-1", "beat-3")


async def _await(mf: ascend.MapFuture[Any]) -> object:
    return await mf


async def _async_for(mf: ascend.MapFuture[Any]) -> object:
    return [r async for r in mf]


async def _async_as_completed(mf: ascend.MapFuture[Any]) -> object:
    return [f async for f in ascend.as_completed(mf.futures)]


async def _gather(mf: ascend.MapFuture[Any]) -> object:
    return await asyncio.gather(*mf.futures, return_exceptions=True)


@pytest.mark.parametrize("return_exceptions", [False, True])
@pytest.mark.parametrize("way", [_await, _async_for, _async_as_completed, _gather])
def test_cancelling_the_task_awaiting_a_map_cancels_it_and_stops_its_work(
    backend: str, beats: Shared, way: Callable[..., Any], return_exceptions: bool
) -> None:
    mf = _beat.map([1, 3], [beats] * 2, chunksize=1, return_exceptions=return_exceptions)
    _beating(beats, "beat-1")
    _beating(beats, "beat-3")

    async def main() -> None:
        task = asyncio.ensure_future(way(mf))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert all(f.cancelled() for f in mf.futures), [f.status for f in mf.futures]
    assert _stopped(beats, "beat-1", "beat-3")


def test_leaving_an_async_for_early_does_not_cancel_the_map(backend: str, beats: Shared) -> None:
    mf = _beat.map([0, 2], [beats] * 2, chunksize=1)

    async def first() -> object:
        async for value in mf:
            return value
        return None

    assert asyncio.run(first()) == 0
    assert mf.result(timeout=_WAIT) == [0, 2]
