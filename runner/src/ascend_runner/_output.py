"""The runner's output: buffered for throughput yet prompt, and a copy kept for storage.

**Buffering.** Writing every line with its own system call (``python -u``, or line
buffering) costs more than the function's own printing when it prints a lot, and
makes whoever reads the pipe wake up once per line. So ``sys.stdout`` is buffered
(64 KiB) and flushed: at least every :data:`FLUSH_INTERVAL` seconds, before anything is
written to ``sys.stderr`` (so the two stay in the order they were written), before a
child process starts or the process forks (audit hooks), before each map item's marker,
at exit and in ``os._exit`` (wrapped). Text written through ``sys.stdout.buffer`` keeps
its place among text lines. A process killed by a signal or a crash in C code can lose
the stdout of its last :data:`FLUSH_INTERVAL` seconds; stderr (tracebacks, logging) is
never held.

**The copy.** Pod logs disappear with the pod; a copy in the job's folder outlives it.
The copy is taken at the file-descriptor level (stdout and stderr, merged, as a
container runtime sees them), so output from C extensions and child processes is kept
too. It passes through a pipe and a thread, so the runner drains it before any way its
process can end: a normal end, ``os._exit`` (the function's, or on ``SIGTERM``) and an
``os.exec*`` that replaces the runner; a ``SIGKILL`` or a crash in C code can lose what
is still in the pipe (at most 64 KiB).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, Final, NoReturn, TextIO

FLUSH_INTERVAL: Final = 0.05
_BUFFER: Final = 65536
_FLUSH_BEFORE: Final = frozenset(
    {"subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn", "os.exec", "os.fork"}
)


_before_hard_exit: list[tuple[int, Callable[[], None]]] = []


def before_hard_exit(hook: Callable[[], None]) -> None:
    """Run ``hook`` in ``os._exit`` (after stdout is flushed, before the process ends),
    whoever calls it (the function, a signal handler, the runner itself), and before an
    ``os.exec*`` replaces the runner. Each hook runs
    at most once, and only in this process (not in a forked child that exits with
    ``os._exit``, as ``multiprocessing`` children do); one that raises stops neither the
    others nor the exit."""
    _before_hard_exit.append((os.getpid(), hook))


def _flush(stream: TextIO) -> None:
    with contextlib.suppress(OSError, ValueError):  # closed, or nobody reads any more
        stream.flush()


class _Stderr(io.TextIOWrapper):
    """stderr that first flushes stdout, so the two keep the order they were written in."""

    stdout: TextIO | None = None

    def write(self, s: str) -> int:
        if self.stdout is not None:
            _flush(self.stdout)
        return super().write(s)


def buffer_output() -> TextIO:
    """Install the buffered ``sys.stdout`` and its companions; returns the new stdout."""
    old_out, old_err = sys.stdout, sys.stderr
    _flush(old_out)
    _flush(old_err)
    stdout = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False), _BUFFER),
        encoding=getattr(old_out, "encoding", None) or "utf-8",
        errors=getattr(old_out, "errors", None) or "strict",
        write_through=True,  # text goes straight to the byte buffer: ordered with .buffer
    )
    stderr = _Stderr(
        io.FileIO(2, "w", closefd=False),  # unbuffered, as with -u
        encoding=getattr(old_err, "encoding", None) or "utf-8",
        errors="backslashreplace",
        write_through=True,
    )
    stderr.stdout = stdout
    # The originals too: Python flushes them at exit, and some code writes to them.
    sys.stdout, sys.stderr = stdout, stderr
    setattr(sys, "__stdout__", stdout)  # noqa: B010 - declared Final in typeshed
    setattr(sys, "__stderr__", stderr)  # noqa: B010

    def run_hooks() -> None:
        while _before_hard_exit:
            pid, hook = _before_hard_exit.pop()
            if pid == os.getpid():
                with contextlib.suppress(Exception):
                    hook()

    def before_child(event: str, _args: tuple[Any, ...]) -> None:
        if event in _FLUSH_BEFORE:
            _flush(stdout)
        if event == "os.exec":  # the runner's process image ends here, as in os._exit
            run_hooks()

    sys.addaudithook(before_child)
    atexit.register(_flush, stdout)
    hard_exit = os._exit

    # Two threads may exit at once (the run timeout's timer and the main thread's SIGTERM
    # handler): the second waits until the first has run the hooks and ended the process.
    # Re-entrant: a signal handler in the thread already exiting goes straight through.
    exiting = threading.RLock()

    def _exit(status: int) -> NoReturn:  # skips atexit, so flush here
        with exiting:
            _flush(stdout)
            run_hooks()
            hard_exit(status)

    os._exit = _exit
    threading.Thread(target=_keep_flushing, args=(stdout,), daemon=True).start()
    return stdout


def _keep_flushing(stream: TextIO) -> None:
    wake = threading.Event()
    while not wake.wait(FLUSH_INTERVAL):
        _flush(stream)


class OutputCopy:
    """Duplicates fds 1 and 2 into a temporary file while still writing them through."""

    def __init__(self) -> None:
        import tempfile  # not imported by calls that keep no copy (it is slow to import)

        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by finish()
        self._saved = os.dup(1)
        read_end, self._write_end = os.pipe()
        # finish() wakes the pump through this pipe: processes the function left behind
        # may hold the output pipe open, so its end of file may never come.
        self._wake_read, self._wake_write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._write_end, 1)
        os.dup2(self._write_end, 2)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True)
        self._thread.start()
        self._finished = False

    def _pass_on(self, chunk: bytes) -> None:
        self._file.write(chunk)
        view = memoryview(chunk)
        with contextlib.suppress(OSError):  # the log reader is gone: keep the copy
            while view:
                view = view[os.write(self._saved, view) :]

    def _pump(self, read_end: int) -> None:
        import select

        try:
            poller = select.poll()
        except AttributeError:  # no poll(): read to the end of file
            with os.fdopen(read_end, "rb", buffering=0) as source:
                while chunk := source.read(65536):
                    self._pass_on(chunk)
            return
        poller.register(read_end, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        finishing = False
        try:
            while True:
                events = dict(poller.poll(0 if finishing else None))
                if self._wake_read in events:
                    poller.unregister(self._wake_read)
                    finishing = True
                if read_end not in events:
                    if finishing:
                        return  # everything written before finish() was passed on
                    continue
                chunk = os.read(read_end, 65536)
                if not chunk:
                    return  # every writer closed the pipe
                self._pass_on(chunk)
        finally:
            os.close(read_end)

    def finish(self) -> bytes:
        """Restore the original descriptors and return everything written once the pump
        has passed it on (what is still in the pipe would be lost with the process);
        ``b""`` when called again. Does not wait for processes the function left behind
        that still hold the output pipe."""
        if self._finished:
            return b""
        self._finished = True
        _flush(sys.stdout)
        _flush(sys.stderr)
        os.dup2(self._saved, 1)
        os.dup2(self._saved, 2)
        os.close(self._write_end)
        os.write(self._wake_write, b"x")
        self._thread.join(timeout=10)
        self._file.seek(0)
        data: bytes = self._file.read()
        self._file.close()
        return data


def upload(url: str, data: bytes, options: dict[str, Any]) -> None:
    from ascend_runner import _storage

    _storage.write(url, [data], options)
