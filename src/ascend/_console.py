"""Printing streamed output: one writer thread, whole lines, above any progress bar.

Output lines of running calls arrive on the scheduler's loop in batches. Writing them
there would let a slow terminal (or a full pipe) stall every call, so the loop only
queues them; one writer thread (``ascend-console``) writes everything queued at once,
through ``tqdm.write`` while a progress bar is shown, so the bar is cleared first and
redrawn below the lines instead of being glued to them. ``sys.stdout`` is looked up at
each write, so redirections made by the application take effect.

A call's future is resolved only after the output it printed is written
(:meth:`Console.printed`, waiting at most :data:`PRINT_PATIENCE` seconds), so a script
that prints ``fut.result()`` shows the call's output before its result, and nothing is
left unprinted at exit; a call that printed nothing never waits for others' output.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Final

_WRITE_TIMEOUT_AT_EXIT: Final = 5.0
PRINT_PATIENCE: Final = 5.0
"""Seconds a call's outcome waits at most for its own output to be printed."""

_bars_lock = threading.Lock()
_bars = 0  # progress bars being drawn in this terminal (see ascend._progress)


def bar_shown(shown: bool) -> None:
    """A progress bar was opened (True) or closed (False) in this process."""
    global _bars
    with _bars_lock:
        _bars += 1 if shown else -1


def _write_plain(text: str) -> None:
    out = sys.stdout
    if out is None:  # pythonw, or closed by the application
        return
    out.write(text)
    out.flush()


def _write_above_bars(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout, end="")
    if sys.stdout is not None:
        sys.stdout.flush()


class Console:
    """Writes queued text to ``sys.stdout`` from its own thread, in queue order."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[tuple[str, list[str]]] = []
        self._queued = 0  # blocks ever queued
        self._written = 0  # blocks ever written (or given up on)
        self.backlog = 0  # characters queued and not yet written
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread: threading.Thread | None = None
        # A forked child has no writer thread: it starts its own on first use.
        os.register_at_fork(after_in_child=self._forget_after_fork)

    def _forget_after_fork(self) -> None:
        self._cond = threading.Condition()
        self._queue, self._waiters, self._thread = [], [], None
        self._queued = self._written = self.backlog = 0

    def write(self, text: str) -> int:
        """Queue ``text`` (whole lines, each ending with a newline); returns at once, with
        the ticket :meth:`printed` takes."""
        return self.write_lines("", [text.removesuffix("\n")])

    def write_lines(self, prefix: str, lines: list[str]) -> int:
        """Queue ``lines`` (without newlines), each to be printed after ``prefix``; returns
        the ticket :meth:`printed` takes to wait for them.

        The lines are joined on the writer thread, not the caller's (the loop's)."""
        size = sum(map(len, lines)) + (len(prefix) + 1) * len(lines)
        with self._cond:
            self.backlog += size
            self._queue.append((prefix, lines))
            self._queued += 1
            ticket = self._queued
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ascend-console", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return ticket

    async def printed(
        self, ticket: int | None = None, patience: float | None = PRINT_PATIENCE
    ) -> None:
        """Wait until the text of ``ticket`` (default: all queued so far) and all queued
        before it has been written, or ``patience`` seconds passed (``None``: no limit).
        A terminal that does not take output (a stuck pipe, a paused terminal) may delay
        a call's outcome, never withhold it."""
        with self._cond:
            target = self._queued if ticket is None else ticket
            if self._written >= target:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append((target, asyncio.get_running_loop(), waiter))
        if patience is None:
            await waiter
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), patience)

    def flush(self, timeout: float = _WRITE_TIMEOUT_AT_EXIT) -> bool:
        """Block until everything queued so far is written; False if ``timeout`` ran out."""
        with self._cond:
            target = self._queued
            return self._cond.wait_for(lambda: self._written >= target, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                blocks, self._queue = self._queue, []
            text = "".join(_joined(prefix, lines) for prefix, lines in blocks)
            try:
                write: Callable[[str], None] = _write_above_bars if _bars else _write_plain
                write(text)
            except Exception:  # noqa: S110 - a closed or broken stdout must not stop the calls
                pass
            with self._cond:
                self.backlog -= len(text)
                self._written += len(blocks)
                ready = [w for w in self._waiters if w[0] <= self._written]
                self._waiters = [w for w in self._waiters if w[0] > self._written]
                self._cond.notify_all()
            for _, loop, waiter in ready:
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                    loop.call_soon_threadsafe(_set_if_pending, waiter)


def _joined(prefix: str, lines: list[str]) -> str:
    return prefix + f"\n{prefix}".join(lines) + "\n"


def _set_if_pending(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


console: Final = Console()
"""The process's console (there is one ``sys.stdout``)."""
atexit.register(console.flush)
