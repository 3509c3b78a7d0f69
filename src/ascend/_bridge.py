"""The one way from blocking code to ascend's loop, and the threads user code runs on.

Every blocking wait in ascend (``Future.result()``, reading logs with ``for``,
``MapFuture.attach``, ...) goes through :func:`wait`. It refuses to block ascend's own
scheduler loop thread (that would stall every call in the process for ever) and warns,
once, when it blocks a running asyncio event loop (where ``await`` is the fix).

User code handed to ascend — done-callbacks, progress callbacks, printing of streamed
output — never runs on the scheduler loop either: :func:`call_soon` queues it on a
:class:`Dispatcher` thread, so a callback that blocks (even one that waits for another
call) stalls at most the callbacks after it, never ascend's I/O.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from ascend._errors import BlockingWaitError

T = TypeVar("T")

_loop_threads: set[int] = set()
_warned = False


def register_loop_thread() -> None:
    """Mark the calling thread as ascend's scheduler loop thread."""
    _loop_threads.add(threading.get_ident())


def on_loop_thread() -> bool:
    """True when called from ascend's scheduler loop thread."""
    return threading.get_ident() in _loop_threads


_AWAIT_INSTEAD = "use `await fut` (or asyncio.wait_for(fut, timeout)) inside async code"


def guard(what: str, fix: str = _AWAIT_INSTEAD) -> None:
    """Check that the calling thread may block waiting for ``what``; ``fix`` is what the
    warning tells async code to do instead.

    Raises:
        BlockingWaitError: on ascend's scheduler loop thread, where the wait could never
            end (the loop that would end it is the one waiting).
    Warns (``RuntimeWarning``, once per process) when an asyncio event loop runs in this
    thread: the wait blocks that loop and every task on it.
    """
    global _warned
    if on_loop_thread():
        raise BlockingWaitError(
            f"{what} blocks, and it was called on ascend's scheduler loop thread, where "
            "it would wait for ever (the loop that ends the wait is the one blocked). "
            "Fix: do not wait for calls inside code ascend runs on its loop; use "
            "fut.add_done_callback(...) or await the future from your own event loop."
        )
    if not _warned and _running_loop() is not None and not _in_notebook_cell():
        _warned = True
        warnings.warn(
            f"{what} blocks this thread's running asyncio event loop; every other task "
            f"on the loop waits too. Fix: {fix}.",
            RuntimeWarning,
            stacklevel=4,
        )


def _in_notebook_cell() -> bool:
    """True for a Jupyter cell's own code: the kernel runs cells from its event loop, and
    a cell that waits for a result is meant to block (``await`` is there for the rest)."""
    if "ipykernel" not in sys.modules or threading.current_thread() is not threading.main_thread():
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def wait(
    future: concurrent.futures.Future[T],
    timeout: float | None,
    what: str,
    fix: str = _AWAIT_INSTEAD,
) -> T:
    """Block until ``future`` (usually from ``run_coroutine_threadsafe``) has a result.

    The single guarded bridge for work that ascend runs on its loop on behalf of a
    blocking caller. ``timeout`` is in seconds; raises ``TimeoutError`` when it runs out
    (the work is then cancelled), :class:`BlockingWaitError` on the loop thread.
    """
    guard(what, fix)
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise


class Dispatcher:
    """One daemon thread that runs queued functions in order, started on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on this dispatcher's thread, after everything queued before."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put((fn, args))

    def _serve(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception:
                # What concurrent.futures does with a failing done-callback.
                logging.getLogger("concurrent.futures").exception(
                    "exception calling callback for %r", args[0] if args else fn
                )

    def drain(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` seconds) until everything queued so far has run."""
        if self._thread is None or threading.current_thread() is self._thread:
            return True
        done = threading.Event()
        self._queue.put((done.set, ()))
        return done.wait(timeout)


callbacks = Dispatcher("ascend-callbacks")
"""Done-callbacks and progress callbacks."""
output = Dispatcher("ascend-output")
"""Printing of streamed output lines (kept apart so a blocked callback cannot stop it)."""


def call_soon(fn: Callable[..., Any], *args: Any) -> None:
    """Run user code off the loop: on the callbacks thread when called on the loop
    thread, else right here."""
    if on_loop_thread():
        callbacks.submit(fn, *args)
    else:
        fn(*args)
