"""Futures that are both ``concurrent.futures.Future`` and awaitable."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from concurrent.futures import _base
from typing import Any, Generic, Literal, TypeVar

T = TypeVar("T")

Status = Literal["pending", "running", "finished", "failed", "cancelled"]

_MAX_LOG_LINES = 100_000


_LOG_CREATION = threading.Lock()


class _LogBuffer:
    """Output lines of one call, readable from any thread and any event loop.

    Kept in memory up to ``_MAX_LOG_LINES`` (older lines are then dropped and a marker
    says how many); the runner's complete output stays in the job's storage folder.
    """

    __slots__ = ("_cond", "_dropped", "_lines", "_waiters", "closed")

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._dropped = 0
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.closed = False

    def append(self, line: str) -> None:
        with self._cond:
            if self.closed:
                return
            self._lines.append(line)
            if len(self._lines) > _MAX_LOG_LINES:
                cut = len(self._lines) - _MAX_LOG_LINES
                del self._lines[:cut]
                self._dropped += cut
            self._wake()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        for loop, waiter in self._waiters:
            loop.call_soon_threadsafe(_set_if_pending, waiter)
        self._waiters.clear()

    def _slice(self, position: int) -> tuple[list[str], int]:
        start = max(position - self._dropped, 0)
        lines = self._lines[start:]
        if position < self._dropped:
            lines = [f"[... {self._dropped - position} earlier lines dropped]", *lines]
        return lines, self._dropped + len(self._lines)

    def snapshot(self) -> list[str]:
        with self._cond:
            return self._slice(0)[0]

    def wait_sync(self, position: int, timeout: float | None) -> tuple[list[str], int, bool]:
        with self._cond:
            self._cond.wait_for(
                lambda: self.closed or self._dropped + len(self._lines) > position, timeout
            )
            lines, end = self._slice(position)
            return lines, end, self.closed

    async def wait_async(self, position: int) -> tuple[list[str], int, bool]:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self.closed or self._dropped + len(self._lines) > position:
                    lines, end = self._slice(position)
                    return lines, end, self.closed
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, waiter))
            await waiter


def _set_if_pending(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class LogStream:
    """A call's output lines: those printed so far, then the rest as they come.

    Iterate with ``for`` (blocks between lines) or ``async for``; iteration ends when
    the call is over. ``list(fut.logs())`` after the call returns everything it printed.
    """

    def __init__(
        self,
        buffer: _LogBuffer,
        *,
        follow: bool = True,
        stored: Callable[[], list[str] | None] | None = None,
    ) -> None:
        self._buffer = buffer
        self._follow = follow
        # The stored copy, for a stream that ended empty because the call finished just
        # as it was asked for (before its live output could be followed).
        self._stored = stored

    def __iter__(self) -> Iterator[str]:
        position = 0
        while True:
            lines, position, closed = self._buffer.wait_sync(position, None if self._follow else 0)
            yield from lines
            if closed and position == 0 and self._stored is not None:
                yield from self._stored() or []
            if closed or not self._follow:
                return

    async def __aiter__(self) -> AsyncIterator[str]:
        position = 0
        while True:
            if self._follow:
                lines, position, closed = await self._buffer.wait_async(position)
            else:
                lines, position, closed = self._buffer.wait_sync(position, 0)
            for line in lines:
                yield line
            if closed and position == 0 and self._stored is not None:
                for line in await asyncio.to_thread(self._stored) or []:
                    yield line
            if closed or not self._follow:
                return


class Future(concurrent.futures.Future[T]):
    """The pending result of a remote call.

    A ``concurrent.futures.Future`` (``result()``, ``exception()``, ``done()``,
    ``add_done_callback()``, ``concurrent.futures.wait``/``as_completed``) that can also be
    awaited from any asyncio event loop (``await fut``, ``asyncio.gather``,
    ``asyncio.wait_for``). ``cancel()`` stops the remote work, and cancelling a task that
    awaits the future cancels the call too (use ``asyncio.shield`` to prevent that).

    Example::

        fut = train({"lr": 3e-4})
        print(fut)              # <ascend.Future train job=train-1f2e3d4c5b state=running>
        metrics = fut.result()  # or: metrics = await fut
    """

    def __init__(self, job_id: str, name: str) -> None:
        super().__init__()
        self._job_id = job_id
        self._name = name
        self._status: Status = "pending"
        # Created on first use: most of a large map's items never print or are read.
        self._log_buffer: _LogBuffer | None = None
        self._log_closed = False
        self._cancel_hook: Callable[[], None] | None = None
        # Set when the output was not streamed but stored: reads it on first logs().
        self._log_loader: Callable[[], list[str]] | None = None
        self._log_request: Callable[[], object] | None = None

    @property
    def job_id(self) -> str:
        """The id of the job running this call (a map's items share their map's id)."""
        return self._job_id

    @property
    def status(self) -> Status:
        """``pending``, ``running``, ``finished``, ``failed`` or ``cancelled``."""
        if self.cancelled():
            return "cancelled"
        return self._status

    def running(self) -> bool:
        """True while the remote work runs (a queued call is pending, not running)."""
        return self._status == "running" and not self.done()

    def cancel(self) -> bool:
        """Cancel the call and stop its remote work; False if it had already finished."""
        # What Future.cancel() and set_running_or_notify_cancel() do together, in one
        # step: a call is never "RUNNING" in the executor sense, so waiters in
        # concurrent.futures.wait/as_completed must be told at once.
        with self._condition:
            if self._state in (_base.FINISHED, _base.RUNNING):
                return False
            if self._state in (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED):
                return True
            self._state = _base.CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        self._close_log()
        hook, self._cancel_hook = self._cancel_hook, None
        if hook is not None:
            hook()
        return True

    def result(self, timeout: float | None = None) -> T:
        """Wait for and return the value; Ctrl-C while waiting cancels the call."""
        try:
            return super().result(timeout)
        except KeyboardInterrupt:
            self.cancel()
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the call and return its exception, or None if it succeeded."""
        try:
            return super().exception(timeout)
        except KeyboardInterrupt:
            self.cancel()
            raise

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self).__await__()

    @classmethod
    def attach(cls, job_id: str) -> Future[Any]:
        """A future for a call submitted earlier — by this process or another one.

        It resolves from the cluster and storage: a running Kubernetes Job is followed
        (its output streams again), a finished one yields its published result. Uses the
        current settings (storage, project, user, namespace) to find the job.

        Example::

            fut = ascend.Future.attach("train-1f2e3d4c5b")
            metrics = fut.result()
        """
        from ascend import _config
        from ascend._scheduler import get_scheduler

        return get_scheduler().attach(job_id, _config.current())

    def logs(self, *, follow: bool = True) -> LogStream:
        """The call's output lines so far and, with ``follow``, those still to come.

        A map item whose output is not printed live (``stream_logs`` other than ``True``
        on Kubernetes) has its output streamed from the moment this is first called
        while it runs, or read from the job's storage folder once it has finished.
        """
        loader, self._log_loader = self._log_loader, None
        if loader is not None:
            self._set_output(loader())
            return LogStream(self._log, follow=follow)
        request, self._log_request = self._log_request, None
        if request is None or self.done():
            return LogStream(self._log, follow=follow)
        request()
        return LogStream(self._log, follow=follow, stored=self._take_stored_output)

    def _take_stored_output(self) -> list[str] | None:
        """The stored output, if it became known after the live output was asked for."""
        loader, self._log_loader = self._log_loader, None
        return None if loader is None else loader()

    def _set_output(self, lines: list[str]) -> None:
        """Replace the output lines with a complete, closed set (read from storage)."""
        buffer = _LogBuffer()
        for line in lines:
            buffer.append(line)
        buffer.close()
        self._log_buffer = buffer

    @property
    def _log(self) -> _LogBuffer:
        with _LOG_CREATION:
            if self._log_buffer is None:
                self._log_buffer = _LogBuffer()
                if self._log_closed:
                    self._log_buffer.close()
            return self._log_buffer

    def _close_log(self) -> None:
        with _LOG_CREATION:
            self._log_closed = True
            if self._log_buffer is not None:
                self._log_buffer.close()

    def __repr__(self) -> str:
        return f"<ascend.{type(self).__name__} {self._name} job={self._job_id} state={self.status}>"

    # -- used by the scheduler -------------------------------------------------------

    def _set_status(self, status: Status) -> None:
        if not self.done():
            self._status = status

    def _resolve(self, value: T) -> bool:
        """Set the result unless the future is already done (cancel races are normal)."""
        try:
            self.set_result(value)
        except concurrent.futures.InvalidStateError:
            return False
        self._status = "finished"
        self._close_log()
        return True

    def _fail(self, error: BaseException) -> bool:
        try:
            self.set_exception(error)
        except concurrent.futures.InvalidStateError:
            return False
        self._status = "failed"
        self._close_log()
        return True


class _Aggregate:
    """Resolves a parent future from children, in the children's order."""

    def __init__(
        self,
        parent: Future[list[Any]],
        children: Sequence[concurrent.futures.Future[Any]],
        *,
        return_exceptions: bool,
        cancel_rest_on_error: bool,
        on_child_done: Callable[[concurrent.futures.Future[Any]], None] | None = None,
    ) -> None:
        self._parent = parent
        self._children = list(children)
        self._return_exceptions = return_exceptions
        self._cancel_rest = cancel_rest_on_error
        self._on_child_done = on_child_done
        self._remaining = len(self._children)
        self._lock = threading.Lock()
        parent._cancel_hook = self._cancel_children
        if not self._children:
            parent._resolve([])
        for child in self._children:
            child.add_done_callback(self._child_done)

    def _cancel_children(self) -> None:
        for child in self._children:
            child.cancel()

    def _child_done(self, child: concurrent.futures.Future[Any]) -> None:
        if self._on_child_done is not None:
            self._on_child_done(child)
        if not self._return_exceptions and not self._parent.done():
            error: BaseException | None
            error = concurrent.futures.CancelledError() if child.cancelled() else child.exception()
            if error is not None:
                if self._parent._fail(error) and self._cancel_rest:
                    self._parent._cancel_hook = None
                    self._cancel_children()
                return
        with self._lock:
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._parent._resolve([_outcome(c) for c in self._children])


def _outcome(child: concurrent.futures.Future[Any]) -> Any:
    if child.cancelled():
        return concurrent.futures.CancelledError()
    error = child.exception()
    return error if error is not None else child.result()


class MapFuture(Future[list[T]], Generic[T]):
    """The results of :meth:`RemoteFunction.map`, in input order.

    ``await mf`` or ``mf.result()`` gives the list; ``for r in mf`` / ``async for r in
    mf`` yield results in input order as they arrive; ``mf.futures[i]`` is item ``i``'s
    own future; ``ascend.as_completed(mf.futures)`` gives completion order;
    ``mf.cancel()`` cancels every item not yet finished.

    With ``return_exceptions=False`` the first failure cancels the remaining items and
    is raised (with a note naming its index); with ``True`` failures take their place in
    the list as exception objects.
    """

    def __init__(
        self,
        job_id: str,
        name: str,
        futures: Sequence[Future[T]],
        *,
        return_exceptions: bool,
        on_item_done: Callable[[concurrent.futures.Future[Any]], None] | None = None,
    ) -> None:
        super().__init__(job_id, name)
        self._futures = list(futures)
        self._return_exceptions = return_exceptions
        self._status = "running"
        _Aggregate(
            self,
            self._futures,
            return_exceptions=return_exceptions,
            cancel_rest_on_error=not return_exceptions,
            on_child_done=on_item_done,
        )

    @classmethod
    def attach(cls, job_id: str, *, return_exceptions: bool = False) -> MapFuture[Any]:
        """A map future for a map submitted earlier — by this process or another one.

        Reads the map's ``meta.json`` from storage (a short blocking read), then follows
        its Indexed Job: items already finished resolve from their published results,
        the others as they finish. Uses the current settings to find the job.

        Example::

            grid = ascend.MapFuture.attach("train-1f2e3d4c5b", return_exceptions=True)
            for metrics in grid: ...
        """
        from ascend import _config
        from ascend._scheduler import get_scheduler

        return get_scheduler().attach_map(
            job_id, _config.current(), return_exceptions=return_exceptions
        )

    @property
    def futures(self) -> list[Future[T]]:
        """One future per input item, in input order."""
        return list(self._futures)

    def __len__(self) -> int:
        return len(self._futures)

    def __iter__(self) -> Iterator[T | BaseException]:
        for fut in self._futures:
            if self._return_exceptions:
                error = fut.exception()
                yield error if error is not None else fut.result()
            else:
                yield fut.result()

    async def __aiter__(self) -> AsyncIterator[T | BaseException]:
        for fut in self._futures:
            try:
                yield await asyncio.shield(fut)  # leaving the loop must not cancel items
            except Exception as error:
                if not self._return_exceptions:
                    raise
                yield error

    def __repr__(self) -> str:
        done = sum(f.done() for f in self._futures)
        return (
            f"<ascend.MapFuture {self._name} job={self._job_id} "
            f"done={done}/{len(self._futures)} state={self.status}>"
        )


def gather(
    *futures: concurrent.futures.Future[Any], return_exceptions: bool = False
) -> Future[list[Any]]:
    """One future for the results of several, in the order given.

    Await it or call ``.result()``. With ``return_exceptions=False`` the first failure
    becomes the gathered future's exception (the others keep running, as with
    ``asyncio.gather``); with ``True`` exceptions take their place in the list.
    Cancelling the gathered future cancels every one of them.

    Example::

        a, b = await ascend.gather(train(x), train(y))
    """
    parent: Future[list[Any]] = Future("gather", "gather")
    parent._status = "running"
    _Aggregate(parent, futures, return_exceptions=return_exceptions, cancel_rest_on_error=False)
    return parent


class as_completed:
    """Iterate futures as they finish, with ``for`` or ``async for``.

    Yields each future (already done) in completion order; call ``.result()`` on it.
    ``timeout`` (seconds, ``for`` only) raises ``TimeoutError`` when it runs out.

    Example::

        for fut in ascend.as_completed(futures):
            print(fut.result())
    """

    def __init__(
        self, futures: Sequence[concurrent.futures.Future[Any]], timeout: float | None = None
    ) -> None:
        self._futures = list(dict.fromkeys(futures))
        self._timeout = timeout

    def __iter__(self) -> Iterator[concurrent.futures.Future[Any]]:
        return concurrent.futures.as_completed(self._futures, timeout=self._timeout)

    async def __aiter__(self) -> AsyncIterator[concurrent.futures.Future[Any]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[concurrent.futures.Future[Any]] = asyncio.Queue()
        for fut in self._futures:
            fut.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, f))
        for _ in self._futures:
            yield await queue.get()


def wait(
    futures: Sequence[concurrent.futures.Future[Any]],
    timeout: float | None = None,
    return_when: str = concurrent.futures.ALL_COMPLETED,
) -> concurrent.futures._base.DoneAndNotDoneFutures[Any]:
    """Block until futures finish, like ``concurrent.futures.wait``; returns ``(done, not_done)``.

    ``return_when`` is ``FIRST_COMPLETED``, ``FIRST_EXCEPTION`` or ``ALL_COMPLETED`` (the
    names in ``concurrent.futures``). In async code use ``asyncio.wait`` on the futures
    wrapped with ``asyncio.wrap_future``, or ``ascend.as_completed``.
    """
    return concurrent.futures.wait(futures, timeout=timeout, return_when=return_when)
