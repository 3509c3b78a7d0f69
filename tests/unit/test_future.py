import asyncio
import concurrent.futures
import threading

import pytest

import ascend
from ascend._future import Future


def _future(name: str = "f") -> Future:
    return Future(f"{name}-0123456789", name)


class _Control:
    """A job control that records what the future asked of its job."""

    def __init__(self, stored: list[str] | None = None) -> None:
        self.cancelled: list[int] = []
        self.requested: list[int] = []
        self.stored: list[str] | None = stored

    def cancel(self, item: int) -> None:
        self.cancelled.append(item)

    def request_output(self, item: int) -> None:
        self.requested.append(item)

    def stored_output(self, item: int) -> list[str] | None:
        stored, self.stored = self.stored, None
        return stored


def test_future_is_a_concurrent_future_with_a_readable_repr() -> None:
    fut = _future("train")
    assert isinstance(fut, concurrent.futures.Future)
    assert repr(fut) == "<ascend.Future train job=train-0123456789 state=pending>"
    fut._resolve(3)
    assert fut.result() == 3 and fut.status == "finished"
    assert "state=finished" in repr(fut)


def test_future_can_be_awaited_from_another_thread_resolving_it() -> None:
    fut = _future()

    async def main() -> int:
        threading.Timer(0.05, fut._resolve, args=(7,)).start()
        return await asyncio.wait_for(fut, timeout=10)

    assert asyncio.run(main()) == 7


def test_awaiting_task_cancelled_cancels_the_call() -> None:
    fut = _future()
    control = _Control()
    fut._bind(control, 3)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fut, timeout=0.05)

    asyncio.run(main())
    assert fut.cancelled() and control.cancelled == [3]


def test_cancel_tells_the_job_once_and_not_after_completion() -> None:
    fut = _future()
    control = _Control()
    fut._bind(control, 0)
    assert fut.cancel() and fut.cancel()
    assert control.cancelled == [0]
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result()
    done = _future()
    done._resolve(1)
    assert not done.cancel()


def test_resolving_a_cancelled_future_is_ignored() -> None:
    fut = _future()
    fut.cancel()
    assert not fut._resolve(1) and not fut._fail(ValueError())


def test_gather_keeps_order_and_raises_first_error() -> None:
    a, b, c = _future("a"), _future("b"), _future("c")
    gathered = ascend.gather(a, b, c)
    c._resolve(3)
    a._resolve(1)
    assert not gathered.done()
    b._resolve(2)
    assert gathered.result() == [1, 2, 3]

    x, y = _future(), _future()
    failing = ascend.gather(x, y)
    y._fail(KeyError("y"))
    with pytest.raises(KeyError):
        failing.result(timeout=1)
    assert not x.cancelled(), "gather does not cancel the others, like asyncio.gather"


def test_gather_with_return_exceptions_and_cancellation() -> None:
    a, b = _future(), _future()
    gathered = ascend.gather(a, b, return_exceptions=True)
    a._fail(ValueError("a"))
    b.cancel()
    first, second = gathered.result(timeout=1)
    assert isinstance(first, ValueError) and isinstance(second, concurrent.futures.CancelledError)
    c, d = _future(), _future()
    parent = ascend.gather(c, d)
    parent.cancel()
    assert c.cancelled() and d.cancelled()


def test_map_future_cancels_the_rest_on_first_error_and_iterates_in_order() -> None:
    items = [_future() for _ in range(3)]
    mf = ascend.MapFuture("m-0", "m", items, return_exceptions=False)
    items[0]._resolve(0)
    items[1]._fail(ZeroDivisionError())
    with pytest.raises(ZeroDivisionError):
        mf.result(timeout=1)
    assert items[2].cancelled()

    items = [_future() for _ in range(3)]
    mf = ascend.MapFuture("m-1", "m", items, return_exceptions=True)
    for i, fut in enumerate(items):
        fut._resolve(i) if i != 1 else fut._fail(KeyError(i))
    values = list(mf)
    assert values[0] == 0 and isinstance(values[1], KeyError) and values[2] == 2
    assert len(mf) == 3 and mf.futures == items


def test_as_completed_yields_in_completion_order_sync_and_async() -> None:
    futures = [_future(str(i)) for i in range(3)]
    for i in (2, 0, 1):
        futures[i]._resolve(i)
    assert {f.result() for f in ascend.as_completed(futures)} == {0, 1, 2}

    async def main() -> list[int]:
        fresh = [_future(str(i)) for i in range(3)]
        loop = asyncio.get_running_loop()
        for delay, i in ((0.01, 2), (0.05, 0), (0.1, 1)):
            loop.call_later(delay, fresh[i]._resolve, i)
        return [f.result() async for f in ascend.as_completed(fresh)]

    assert asyncio.run(main()) == [2, 0, 1]


def test_wait_returns_done_and_not_done() -> None:
    a, b = _future(), _future()
    a._resolve(1)
    done, not_done = ascend.wait([a, b], timeout=0.01)
    assert done == {a} and not_done == {b}


def test_logs_stream_lines_so_far_and_to_come_sync_and_async() -> None:
    fut = _future()
    fut._log.append("one")
    threading.Timer(0.05, lambda: (fut._log.append("two"), fut._resolve(None))).start()
    assert list(fut.logs()) == ["one", "two"]
    assert list(fut.logs(follow=False)) == ["one", "two"]

    other = _future()

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, other._log.append, "a")
        loop.call_later(0.04, other._resolve, None)
        return [line async for line in other.logs()]

    assert asyncio.run(main()) == ["a"]


def test_a_future_holds_no_log_buffer_until_output_arrives_or_is_read() -> None:
    quiet, chatty = _future("quiet"), _future("chatty")
    assert quiet._log_buffer is None and chatty._log_buffer is None
    chatty._log.append("hello")
    quiet._resolve(1)
    chatty._resolve(2)
    assert quiet._log_buffer is None, "a future that never printed keeps no buffer"
    assert list(quiet.logs()) == []  # created closed: iteration ends at once
    assert list(chatty.logs()) == ["hello"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_logs_asked_for_as_the_item_finishes_come_from_its_stored_copy(mode: str) -> None:
    # The live output was requested, but the item finished before it could be followed:
    # the backend then reports the stored copy, and the stream yields that.
    fut = _future("item")
    control = _Control()
    fut._bind(control, 0)
    stream = fut.logs()
    assert control.requested == [0]
    control.stored = ["from storage 1", "from storage 2"]
    fut._resolve(0)

    async def collect() -> list[str]:
        return [line async for line in stream]

    lines = list(stream) if mode == "sync" else asyncio.run(collect())
    assert lines == ["from storage 1", "from storage 2"]


def test_live_output_is_not_replaced_by_the_stored_copy() -> None:
    fut = _future("item")
    control = _Control()
    fut._bind(control, 0)
    stream = fut.logs()
    fut._log.append("live")
    control.stored = ["stored"]
    fut._resolve(0)
    assert list(stream) == ["live"]
