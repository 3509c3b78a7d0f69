"""The local backend: each work unit is the runner in a fresh subprocess.

Exactly the runner that runs in pods, started as ``python -u -m ascend_runner`` in its
own process group, so timeouts and cancellation can stop it and everything it spawned.
Output is read line by line as it is printed. At most ``max_workers`` processes run at
once (default: the number of CPU cores).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio
from anyio.abc import Process

from ascend._errors import (
    AscendError,
    DeadlineExceeded,
    VersionMismatch,
    WorkerFailed,
)
from ascend._logging import logger
from ascend.backends import ItemOutput, Job, JobObserver, WorkUnit
from ascend_runner import protocol
from ascend_runner._storage import local_path

log = logger

_KILL_GRACE: Final = 2.0
_TAIL_LINES: Final = 20
_RUNNER: Final = [sys.executable, "-u", "-m", "ascend_runner"]
# asyncio kills a still-running child when its loop closes at interpreter exit. A
# detached call therefore runs the runner under this launcher: only the launcher dies
# then, and the runner, in the same process group, carries on. The launcher passes the
# runner's exit code or signal through, so diagnosis is unchanged.
_DETACHED: Final = [
    sys.executable,
    "-c",
    "import os, subprocess, sys\n"
    f"code = subprocess.call({_RUNNER!r})\n"
    "if code < 0:\n    os.kill(os.getpid(), -code)\n"
    "sys.exit(code)\n",
]


class LocalBackend:
    """Runs each work unit as a runner subprocess on this machine."""

    name = "local"

    def __init__(self, max_workers: int) -> None:
        self._limiter = anyio.CapacityLimiter(max_workers)

    async def run(self, job: Job, observer: JobObserver) -> None:
        if local_path(job.settings.storage) is None and job.settings.storage.startswith("memory"):
            raise AscendError(
                f"storage {job.settings.storage!r} lives inside this process, but the local "
                "backend runs each call in another process. Fix: use a file:// path or an "
                "object store URL."
            )
        # A map's own limit applies on top of the backend's, which all jobs share.
        own = anyio.CapacityLimiter(job.max_parallel or len(job.units))
        async with anyio.create_task_group() as tg:
            for unit in job.units:
                tg.start_soon(self._run_unit, job, unit, observer, own)

    async def _run_unit(
        self, job: Job, unit: WorkUnit, observer: JobObserver, own: anyio.CapacityLimiter
    ) -> None:
        async with own, self._limiter:
            attempts = job.resources.retries + 1
            for attempt in range(attempts):
                if not observer.wanted(unit.items):
                    return
                error = await self._attempt(job, unit, attempt, observer)
                if error is None:
                    observer.finished(unit.items)
                    return
                retryable = not isinstance(error, VersionMismatch) and not (
                    isinstance(error, WorkerFailed)
                    and error.exit_code in protocol.ExitCode.reserved()
                )
                if not retryable or attempt + 1 == attempts:
                    observer.failed(unit.items, error)
                    return
                log.warning(
                    "retrying",
                    job=job.job_id,
                    unit=unit.index,
                    attempt=attempt + 1,
                    of=attempts,
                    error=str(error),
                )

    async def _attempt(
        self, job: Job, unit: WorkUnit, attempt: int, observer: JobObserver
    ) -> AscendError | None:
        """One runner process; returns why it failed, or None when results are published."""
        env = {
            **os.environ,
            **job.resources.env,
            **job.runner_env(unit),
            protocol.ENV_ATTEMPT: f"local-{attempt}",
            protocol.ENV_SKIP_DONE: "1" if attempt else "0",
            "PYTHONUNBUFFERED": "1",
        }
        detach_log: str | None = None
        sink: Any = subprocess.PIPE
        if job.settings.detach:
            # Detached runners outlive this process, so their output goes to a file, not a pipe.
            detach_log = await anyio.to_thread.run_sync(_detach_log_path, job, unit)
            sink = await anyio.to_thread.run_sync(open, detach_log, "wb")
        try:
            # Shielded: a cancel arriving mid-spawn must not lose track of the new process;
            # it is delivered at the next await, inside the try below that stops it.
            with anyio.CancelScope(shield=True):
                process = await anyio.open_process(
                    _DETACHED if detach_log else _RUNNER,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        finally:
            if detach_log:
                sink.close()
        observer.started(unit.items)
        output = _Output(unit.items.start, observer, deque(maxlen=_TAIL_LINES))
        timeout = job.resources.timeout * len(unit.items) if job.resources.timeout else None
        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:
                    if process.stdout is not None:
                        tg.start_soon(output.pump, process.stdout)
                    code = await process.wait()
        except TimeoutError:
            with anyio.CancelScope(shield=True):
                await _stop(process)
            return DeadlineExceeded(
                f"{job.name} (job {job.job_id}) ran past its timeout of "
                f"{job.resources.timeout:g} s per call and was stopped. Fix: raise "
                "timeout=... or give it less work per call."
            )
        except BaseException:
            # A detached call whose items are still wanted is being left behind at exit:
            # let it run. A cancelled call is stopped, detached or not.
            if not (job.settings.detach and observer.wanted(unit.items)):
                with anyio.CancelScope(shield=True):
                    await _stop(process)
            raise
        finally:
            if detach_log:
                with anyio.CancelScope(shield=True):
                    lines = await anyio.to_thread.run_sync(_read_lines, detach_log)
                for line in lines:
                    output.line(line)
        return _diagnose(job, code, output.tail)


class _Output(ItemOutput):
    """A runner's output from its pipe."""

    async def pump(self, stream: AsyncIterator[bytes]) -> None:
        pending = b""
        async for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self.line(raw.decode(errors="replace").rstrip("\r"))
        if pending:
            self.line(pending.decode(errors="replace"))


def _diagnose(job: Job, code: int, tail: deque[str]) -> AscendError | None:
    if code in (protocol.ExitCode.OK, protocol.ExitCode.USER_EXCEPTION):
        return None
    last = "\n".join(tail)
    reason = next(
        (
            line[len(protocol.DIAGNOSTIC_PREFIX) :]
            for line in reversed(tail)
            if line.startswith(protocol.DIAGNOSTIC_PREFIX)
        ),
        "",
    )
    where = f"{job.name} (job {job.job_id})"
    if code == protocol.ExitCode.VERSION_MISMATCH:
        return VersionMismatch(f"{where}: the runner refused the package: {reason}")
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return WorkerFailed(
            f"{where}: the runner process was killed by {name}. Last output:\n{last}",
            exit_code=128 - code,
            logs=last,
        )
    if code in protocol.ExitCode.reserved():
        meaning = protocol.ExitCode(code).name.lower().replace("_", " ")
        return WorkerFailed(
            f"{where}: the runner failed ({meaning}, exit code {code}): {reason}",
            exit_code=code,
            logs=last,
        )
    return WorkerFailed(
        f"{where}: the runner process exited with code {code} without publishing a result. "
        f"Last output:\n{last}",
        exit_code=code,
        logs=last,
    )


async def _stop(process: Process) -> None:
    """SIGTERM the process group, SIGKILL it after a grace period, reap the process."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with anyio.move_on_after(_KILL_GRACE):
            await process.wait()
            # The leader is gone; make sure nothing it spawned survives it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            return


def _detach_log_path(job: Job, unit: WorkUnit) -> str:
    folder = local_path(job.paths.root)
    if folder is None:
        import tempfile

        folder = os.path.join(tempfile.gettempdir(), "ascend", job.job_id)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"output-{unit.index}.log")


def _read_lines(path: str) -> list[str]:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read().decode(errors="replace").splitlines()
    return []
