"""Futures that are both ``concurrent.futures.Future`` and awaitable."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from concurrent.futures import _base
from typing import Any, Generic, Literal, Protocol, TypeVar

from ascend import _bridge

T = TypeVar("T")

Status = Literal["pending", "running", "finished", "failed", "cancelled"]

_MAX_LOG_LINES = 100_000
_OUTPUT_DRAIN_TIMEOUT = 5.0  # seconds a finished wait waits for the call's lines to print


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
        self.closed: bool = False

    def append(self, line: str) -> None:
        self.extend([line])

    def extend(self, lines: list[str]) -> None:
        with self._cond:
            if self.closed:
                return
            self._lines.extend(lines)
            # Trimmed a tenth at a time: trimming at every line would copy the whole
            # list per line once it is full.
            if len(self._lines) > _MAX_LOG_LINES + _MAX_LOG_LINES // 10:
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
        if timeout != 0:
            _bridge.guard("iterating fut.logs()")
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
        first: Callable[[], _LogBuffer | None] | None = None,
    ) -> None:
        self._buffer = buffer
        self._follow = follow
        # The stored copy, for a stream that ended empty because the call finished just
        # as it was asked for (before its live output could be followed).
        self._stored = stored
        # Read when iteration starts (a finished item's stored copy, which may need a
        # storage read): the buffer to iterate instead, or None to keep this one.
        self._first = first

    def _take_first(self, found: _LogBuffer | None) -> None:
        self._first = None
        if found is not None:
            self._buffer = found

    def __iter__(self) -> Iterator[str]:
        if self._first is not None:
            self._take_first(self._first())
        position = 0
        while True:
            lines, position, closed = self._buffer.wait_sync(position, None if self._follow else 0)
            yield from lines
            if closed and position == 0 and self._stored is not None:
                yield from self._stored() or []
            if closed or not self._follow:
                return

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._first is not None:  # off this loop: the read may wait for storage
            self._take_first(await asyncio.to_thread(self._first))
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


class _ChainedLogs(LogStream):
    """Several calls' output lines, one call's after another's."""

    def __init__(self, streams: Sequence[LogStream]) -> None:
        super().__init__(_LogBuffer())
        self._streams = list(streams)

    def __iter__(self) -> Iterator[str]:
        for stream in self._streams:
            yield from stream

    async def __aiter__(self) -> AsyncIterator[str]:
        for stream in self._streams:
            async for line in stream:
                yield line


class _CallCancelled(asyncio.CancelledError, concurrent.futures.CancelledError):
    """Raised for a cancelled call: caught by ``except concurrent.futures.CancelledError``
    (as ``result()`` raises) and treated as cancellation by asyncio (as ``await`` needs)."""


class JobControl(Protocol):
    """The one interface from a future to the job behind it (the scheduler's job run).

    Every method may be called from any thread and returns promptly, except
    :meth:`stored_output`, which may read storage.
    """

    def cancel(self, item: int) -> None:
        """The future of ``item`` was cancelled: stop that item's remote work."""

    def request_output(self, item: int) -> None:
        """Someone reads ``item``'s logs while it runs: stream its output from now on."""

    def stored_output(self, item: int) -> list[str] | None:
        """``item``'s output read from storage, once, when it was stored rather than
        streamed; None otherwise."""


@dataclasses.dataclass(frozen=True)
class _Callback:
    fn: Callable[[Any], object]
    loop: asyncio.AbstractEventLoop | None = None
    context: contextvars.Context | None = None
    inline: bool = False


def _user_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop running in this thread, unless it is ascend's own."""
    if _bridge.on_loop_thread():
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Future(concurrent.futures.Future[T]):
    """The pending result of a remote call.

    A ``concurrent.futures.Future`` (``result()``, ``exception()``, ``done()``,
    ``add_done_callback()``, ``concurrent.futures.wait``/``as_completed``) that is also an
    asyncio future-like object: ``await fut``, ``asyncio.gather``, ``asyncio.wait``,
    ``asyncio.as_completed``, ``asyncio.wait_for``, ``asyncio.shield`` and
    ``asyncio.timeout`` accept it from any event loop. ``cancel()`` stops the remote work,
    and cancelling a task that awaits the future cancels the call too (use
    ``asyncio.shield`` to prevent that).

    Done-callbacks never run on ascend's scheduler loop: one added from inside a running
    asyncio loop runs on that loop (as with an ``asyncio.Future``); any other runs on the
    ``ascend-callbacks`` thread (or at once in the adding thread if the future is already
    done), so a callback may itself wait for another call.

    Raises (from ``result()``): the function's own exception, an :class:`AscendError`
    for infrastructure faults, ``TimeoutError`` when ``timeout`` seconds pass (the call
    goes on), ``concurrent.futures.CancelledError`` when the call was cancelled,
    :class:`BlockingWaitError` when called on ascend's loop thread.

    Example::

        fut = train({"lr": 3e-4})
        print(fut)              # <ascend.Future train job=train-1f2e3d4c5b state=running>
        metrics = fut.result()  # or: metrics = await fut
    """

    # asyncio's marker of a future-like object (see asyncio.isfuture): a task awaiting
    # this object waits for its done-callback instead of polling.
    _asyncio_future_blocking = False
    _cancel_message: Any = None  # read by asyncio.gather for a cancelled child
    _cancel_reason: str | None = None  # said by result() of a cancelled call

    def __init__(self, job_id: str, name: str) -> None:
        super().__init__()
        self._job_id = job_id
        self._name = name
        self._status: Status = "pending"
        # Created on first use: most of a large map's items never print or are read.
        self._log_buffer: _LogBuffer | None = None
        self._log_closed = False
        self._control: JobControl | None = None
        self._index = 0
        self._done_callbacks: list[_Callback] = []

    def _bind(self, control: JobControl, index: int) -> None:
        """Connect the future to the job that computes it (item ``index`` of the job)."""
        self._control = control
        self._index = index

    @property
    def job_id(self) -> str:
        """The id of the job running this call (a map's items share their map's id)."""
        return self._job_id

    _preemptions = 0

    @property
    def preemptions(self) -> int:
        """Times the cluster took this call off its node (preemption, eviction, drain,
        node loss) and it was run again; these never count against ``retries``."""
        return self._preemptions

    @property
    def status(self) -> Status:
        """``pending``, ``running``, ``finished``, ``failed`` or ``cancelled``."""
        if self.cancelled():
            return "cancelled"
        return self._status

    def running(self) -> bool:
        """True while the remote work runs (a queued call is pending, not running)."""
        return self._status == "running" and not self.done()

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the call and stop its remote work; False if it had already finished.

        ``msg`` is asyncio's cancel message (kept for ``asyncio.gather``).
        """
        # What Future.cancel() and set_running_or_notify_cancel() do together, in one
        # step: a call is never "RUNNING" in the executor sense, so waiters in
        # concurrent.futures.wait/as_completed must be told at once.
        with self._condition:
            if self._state in (_base.FINISHED, _base.RUNNING):
                return False
            if self._state in (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED):
                return True
            self._state = _base.CANCELLED_AND_NOTIFIED
            self._cancel_message = msg
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()
        self._close_log()
        if self._control is not None:
            self._control.cancel(self._index)
        return True

    def _cancel_for(self, reason: str) -> bool:
        """Cancel, saying why (the message a later ``result()`` raises)."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
        return self.cancel()

    def _cancelled_error(self) -> _CallCancelled:
        why = self._cancel_reason or "by fut.cancel() (or Ctrl-C while waiting for it)"
        return _CallCancelled(f"{self._name} (job {self._job_id}) was cancelled {why}.")

    def result(self, timeout: float | None = None) -> T:
        """Wait up to ``timeout`` seconds (None: for ever) and return the value.

        Ctrl-C while waiting cancels the call. See the class docstring for what it raises.
        """
        self._wait(timeout, "fut.result()")
        if self.cancelled():
            raise self._cancelled_error()
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the call and return its exception, or None if it succeeded."""
        self._wait(timeout, "fut.exception()")
        if self.cancelled():
            raise self._cancelled_error()
        return super().exception(0)

    def _wait(self, timeout: float | None, what: str) -> None:
        if self.done():
            return
        _bridge.guard(what)
        try:
            with self._condition:
                if not self._condition.wait_for(self.done, timeout):
                    raise TimeoutError(
                        f"{self!r}: no result within {timeout:g} s; the call goes on. Wait "
                        "again, or cancel() it."
                    )
        except KeyboardInterrupt:
            self.cancel()
            raise
        # Output lines the call printed before it finished are printed before this
        # returns, so the caller's own prints come after them.
        _bridge.output.drain(_OUTPUT_DRAIN_TIMEOUT)

    # -- asyncio future-like ---------------------------------------------------------

    def __await__(self) -> Generator[Any, None, T]:
        if not self.done():
            self._asyncio_future_blocking = True
            try:
                yield self  # the awaiting task adds its wake-up as a done-callback
            except concurrent.futures.CancelledError:
                # Thrown in by the task's wake-up: cancellation, which must pass through
                # ``except Exception`` like asyncio's own.
                raise asyncio.CancelledError() from None
        if not self.done():
            raise RuntimeError("await wasn't used with future")
        if self.cancelled():
            raise asyncio.CancelledError()
        return super().result(0)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The running asyncio loop of the caller (asyncio asks this of a future it
        awaits; an ascend future can be awaited from any loop)."""
        loop = _user_loop()
        if loop is None:
            raise RuntimeError(f"{self!r} can only be awaited inside a running event loop.")
        return loop

    def _make_cancelled_error(self) -> asyncio.CancelledError:
        return asyncio.CancelledError()

    def add_done_callback(
        self, fn: Callable[[Any], object], *, context: contextvars.Context | None = None
    ) -> None:
        """Call ``fn(future)`` once the future is done (see the class docstring for the
        thread it runs on). ``context`` is for asyncio."""
        self._add_callback(_Callback(fn, _user_loop(), context))

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        """Remove every registration of ``fn``; returns how many there were."""
        with self._condition:
            kept = [c for c in self._done_callbacks if c.fn != fn]
            removed = len(self._done_callbacks) - len(kept)
            self._done_callbacks = kept
        return removed

    def _on_done(self, fn: Callable[[Any], object]) -> None:
        """ascend's own short, non-blocking callbacks: run in the thread that settles."""
        self._add_callback(_Callback(fn, inline=True))

    def _add_callback(self, callback: _Callback) -> None:
        with self._condition:
            if not self.done():
                self._done_callbacks.append(callback)
                return
        self._deliver(callback)

    def _invoke_callbacks(self) -> None:
        with self._condition:
            callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            self._deliver(callback)

    def _deliver(self, callback: _Callback) -> None:
        if callback.loop is not None:
            try:
                callback.loop.call_soon_threadsafe(callback.fn, self, context=callback.context)
                return
            except RuntimeError:  # that loop is closed: run it like any other callback
                pass
        if callback.inline:
            _run_callback(callback.fn, self)
        else:
            _bridge.call_soon(_run_callback, callback.fn, self)

    # -- attach and logs ---------------------------------------------------------------

    @classmethod
    def attach(cls, job_id: str) -> Future[Any]:
        """A future for a call submitted earlier — by this process or another one.

        Reads the job's ``meta.json`` and its published result from storage first (a
        short blocking read, up to 60 s each), so a wrong id fails here, not at
        ``result()``, and a finished call's future is done when this returns. Then it
        resolves from the cluster and storage: a running Kubernetes Job is followed (its
        output streams again), a finished one yields its published result. Uses the current settings
        (storage, project, user, namespace) to find the job.

        Raises:
            NoSuchJob: no job of that id under the current storage, project and user,
                or ``job_id`` is not a job id at all (spaces, ``/``, capitals).
            AscendError: the job is a map (attach it with :meth:`MapFuture.attach`),
                or its ``meta.json`` is unreadable; :class:`StorageError` when the
                store cannot be read.
            TypeError: ``job_id`` is not a ``str``.
            TimeoutError: the store did not answer within 60 s.
            BlockingWaitError: called on ascend's own loop thread.

        Example::

            fut = ascend.Future.attach("train-1f2e3d4c5b")
            metrics = fut.result()
        """
        from ascend import _config
        from ascend._scheduler import get_scheduler

        return get_scheduler().attach(job_id, _config.current())

    def logs(self, *, follow: bool = True) -> LogStream:
        """The call's output lines so far and, with ``follow``, those still to come.

        What the function and its child processes wrote to stdout and stderr, in the
        order written, one ``str`` per line without its ``\n`` (a ``\r`` stays part of
        its line; bytes that are not UTF-8 become U+FFFD; no length limit). The last
        line is there even without a final newline.

        A map item whose output is not printed live (``stream_logs`` other than ``True``
        on Kubernetes) has its output streamed from the moment this is first called
        while it runs, or read from the job's storage folder once it has finished.
        """
        control = self._control
        if control is None:
            return LogStream(self._log, follow=follow)
        index = self._index

        def stored_first() -> _LogBuffer | None:
            # Read when iterated, not here: a storage read must not block an event loop.
            stored = control.stored_output(index)
            if stored is None:
                return None
            self._set_output(stored)
            return self._log_buffer

        if self.done():
            return LogStream(self._log, follow=follow, first=stored_first)
        if stored_first() is not None:  # it just finished (while running: no read at all)
            return LogStream(self._log, follow=follow)
        control.request_output(index)
        return LogStream(
            self._log, follow=follow, stored=functools.partial(control.stored_output, index)
        )

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


def _run_callback(fn: Callable[[Any], object], fut: Future[Any]) -> None:
    try:
        fn(fut)
    except Exception:
        logging.getLogger("concurrent.futures").exception("exception calling callback for %r", fut)


class _Aggregate:
    """Resolves a parent future from children, in the children's order.

    It is the parent's :class:`JobControl`: cancelling the parent cancels the children.
    """

    def __init__(
        self,
        parent: Future[list[Any]],
        children: Sequence[concurrent.futures.Future[Any]],
        *,
        return_exceptions: bool,
        cancel_rest_on_error: bool,
        on_child_done: Callable[[concurrent.futures.Future[Any]], None] | None = None,
    ) -> None:
        """``on_child_done`` runs in the thread that settles a child (often ascend's loop
        thread): it must hand anything slow or user-supplied to another thread."""
        self._parent = parent
        self._children = list(children)
        self._return_exceptions = return_exceptions
        self._cancel_rest = cancel_rest_on_error
        self._on_child_done = on_child_done
        self._remaining = len(self._children)
        self._lock = threading.Lock()
        parent._bind(self, 0)
        if not self._children:
            parent._resolve([])
        for child in self._children:
            if isinstance(child, Future):
                child._on_done(self._child_done)
            else:
                child.add_done_callback(self._child_done)

    # -- JobControl of the parent ----------------------------------------------------

    def cancel(self, item: int) -> None:
        self._cancel_children("because the map or gather it belongs to was cancelled")

    def request_output(self, item: int) -> None:
        pass

    def stored_output(self, item: int) -> list[str] | None:
        return None

    def _cancel_children(self, reason: str) -> None:
        for child in self._children:
            if isinstance(child, Future):
                child._cancel_for(reason)
            else:
                child.cancel()

    def _child_done(self, child: concurrent.futures.Future[Any]) -> None:
        if self._on_child_done is not None:
            self._on_child_done(child)  # must not block: it hands user code to a thread
        # An item cancelled on its own (``mf.futures[i].cancel()``) is not a failure of
        # the others: they go on, and the map ends as cancelled once they are done.
        if not self._return_exceptions and not self._parent.done() and not child.cancelled():
            error = child.exception()
            if error is not None:
                if self._parent._fail(error) and self._cancel_rest:
                    index = self._children.index(child)
                    self._cancel_children(
                        f"because item {index} of its map failed first "
                        f"({type(error).__name__}) and return_exceptions is False"
                    )
                return
        with self._lock:
            self._remaining -= 1
            last = self._remaining == 0
        if not last:
            return
        cancelled = next((c for c in self._children if c.cancelled()), None)
        if cancelled is not None and not self._return_exceptions:
            index = self._children.index(cancelled)
            self._parent._fail(
                concurrent.futures.CancelledError(
                    f"item {index} was cancelled; the other items finished (pass "
                    "return_exceptions=True to get their results with the cancelled ones)"
                )
            )
            return
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
    the list as exception objects. Cancelling one item (``mf.futures[i].cancel()``) stops
    only that item: the others go on, and without ``return_exceptions`` the map then
    raises ``CancelledError`` naming the item once they are done.
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

        Reads the map's ``meta.json`` and the results its items have published (blocking,
        up to 60 s each; those items are settled when this returns, successes before
        failures), then follows its Indexed Job: the other items resolve as they finish.
        Uses the current settings to find the job. Raises as :meth:`Future.attach` does
        (a call's id: ``AscendError`` naming ``Future.attach``).

        Example::

            grid = ascend.MapFuture.attach("train-1f2e3d4c5b", return_exceptions=True)
            for metrics in grid: ...
        """
        from ascend import _config
        from ascend._scheduler import get_scheduler

        return get_scheduler().attach_map(
            job_id, _config.current(), return_exceptions=return_exceptions
        )

    def logs(self, *, follow: bool = True) -> LogStream:
        """Every item's output lines, item after item in input order (item 0's lines,
        then item 1's, ...): with ``follow``, each item's lines until it ends before the
        next item's, so a later item's lines wait for the earlier items to finish. The
        lines carry no item number: read ``mf.futures[i].logs()`` for one item's, or
        set ``stream_logs=True`` to see them prefixed ``[job#item]`` as they come.
        """
        # Asked for every item now, so none of their output is missed while the earlier
        # items are read (see :meth:`Future.logs`).
        return _ChainedLogs([fut.logs(follow=follow) for fut in self._futures])

    @property
    def futures(self) -> list[Future[T]]:
        """One future per input item, in input order."""
        return list(self._futures)

    def __len__(self) -> int:
        return len(self._futures)

    def __iter__(self) -> Iterator[T | BaseException]:
        # Ctrl-C while waiting for any item cancels the whole map, as in result().
        for fut in self._futures:
            try:
                fut._wait(None, "iterating a MapFuture")
            except KeyboardInterrupt:
                self.cancel()
                raise
            if self._return_exceptions:
                yield _outcome(fut)
            else:
                yield fut.result()

    async def __aiter__(self) -> AsyncIterator[T | BaseException]:
        for fut in self._futures:
            try:
                # Shielded: leaving the loop early (break) must not cancel items; a
                # cancelled awaiting task cancels the whole map, as ``await mf`` does.
                value: Any = await asyncio.shield(fut)
            except asyncio.CancelledError:
                if not fut.cancelled():  # the awaiting task was cancelled
                    self.cancel()
                    raise
                if not self._return_exceptions:  # the item itself was cancelled
                    raise concurrent.futures.CancelledError() from None
                yield concurrent.futures.CancelledError()
            except Exception as error:
                if not self._return_exceptions:
                    raise
                yield error
            else:
                yield value

    def __repr__(self) -> str:
        done = sum(f.done() for f in self._futures)
        # With return_exceptions the map "finishes" though items raised: say how many.
        failed = sum(
            f.done() and not f.cancelled() and f.exception() is not None for f in self._futures
        )
        cancelled = sum(f.cancelled() for f in self._futures)
        extra = "".join(
            f" {name}={n}" for name, n in (("failed", failed), ("cancelled", cancelled)) if n
        )
        return (
            f"<ascend.MapFuture {self._name} job={self._job_id} "
            f"done={done}/{len(self._futures)}{extra} state={self.status}>"
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
        _bridge.guard("iterating ascend.as_completed")
        iterator = concurrent.futures.as_completed(self._futures, timeout=self._timeout)
        try:
            yield from iterator
        except KeyboardInterrupt:
            _cancel_pending(self._futures)  # what it waited for is cancelled
            raise

    async def __aiter__(self) -> AsyncIterator[concurrent.futures.Future[Any]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[concurrent.futures.Future[Any]] = asyncio.Queue()

        def arrived(fut: concurrent.futures.Future[Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, fut)

        for fut in self._futures:
            if isinstance(fut, Future):
                fut._on_done(arrived)
            else:
                fut.add_done_callback(arrived)
        try:
            for _ in self._futures:
                yield await queue.get()
        except asyncio.CancelledError:
            _cancel_pending(self._futures)
            raise


def _cancel_pending(futures: Sequence[concurrent.futures.Future[Any]]) -> None:
    for fut in futures:
        fut.cancel()


def wait(
    futures: Sequence[concurrent.futures.Future[Any]],
    timeout: float | None = None,
    return_when: str = concurrent.futures.ALL_COMPLETED,
) -> concurrent.futures._base.DoneAndNotDoneFutures[Any]:
    """Block until futures finish, like ``concurrent.futures.wait``; returns ``(done, not_done)``.

    ``return_when`` is ``FIRST_COMPLETED``, ``FIRST_EXCEPTION`` or ``ALL_COMPLETED`` (the
    names in ``concurrent.futures``); ``timeout`` in seconds. Ctrl-C while waiting
    cancels the futures still pending. In async code use ``asyncio.wait`` on the futures
    themselves, or ``ascend.as_completed``.
    """
    _bridge.guard("ascend.wait()")
    try:
        return concurrent.futures.wait(futures, timeout=timeout, return_when=return_when)
    except KeyboardInterrupt:
        _cancel_pending(futures)
        raise
