"""The local backend: each work unit is the runner in a fresh subprocess.

Exactly the runner that runs in pods, started as ``python -u -m ascend_runner`` in its
own process group, so timeouts and cancellation can stop it and everything it spawned.
Output is read line by line as it is printed. At most ``max_workers`` processes run at
once (default: the number of CPU cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio
from anyio.abc import Process

from ascend import _config
from ascend._errors import (
    AscendError,
    VersionMismatch,
    WorkerFailed,
)
from ascend._logging import logger
from ascend.backends import ItemOutput, Job, JobObserver, WorkUnit, _diagnosis, _local_records
from ascend_runner import _bootstrap, protocol
from ascend_runner._storage import local_path

log = logger

_KILL_GRACE: Final = 2.0
_DRAIN_GRACE: Final = 2.0  # seconds to read output still in the pipe after the runner exits
_TAIL_LINES: Final = 20
# Seconds past a unit's timeout (and startup_timeout) before the backend stops a runner
# that did not stop itself.
_BACKSTOP: Final = 5.0
_RUNNER: Final = [sys.executable, "-u", "-m", "ascend_runner"]


# asyncio kills a still-running child when its loop closes at interpreter exit. A
# detached call therefore runs the runner under this launcher: only the launcher dies
# then, and the runner, in the same process group, carries on. The launcher passes the
# runner's exit code or signal through, so diagnosis is unchanged.
def _detached(command: list[str]) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import os, subprocess, sys\n"
        f"code = subprocess.call({command!r})\n"
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
        spawned = _Spawned(len(job.units), observer)
        async with anyio.create_task_group() as tg:
            for unit in job.units:
                tg.start_soon(self._run_unit, _Unit(job, unit, observer, own, spawned))

    async def _run_unit(self, u: _Unit) -> None:
        # Cancelling this unit's items (and only them) stops its process.
        async with anyio.create_task_group() as tg:

            async def stop_when_unwanted() -> None:
                await u.observer.until_unwanted(u.unit.items)
                tg.cancel_scope.cancel()

            tg.start_soon(stop_when_unwanted)
            try:
                await _record(u, state="pending")
                await self._run_attempts(u)
            except BaseException:
                # A detached unit left running at exit goes on: its record stays.
                if not (u.job.settings.detach and u.observer.wanted(u.unit.items)):
                    with anyio.CancelScope(shield=True):
                        await _record(u, state="cancelled")
                raise
            finally:
                # Also when it never started: nothing is left to wait for.
                u.spawned.one(u.unit.index)
                tg.cancel_scope.cancel()

    async def _run_attempts(self, u: _Unit) -> None:
        job, unit, observer = u.job, u.unit, u.observer
        async with u.own, self._limiter:
            attempts = job.resources.retries + 1
            for attempt in range(attempts):
                if not observer.wanted(unit.items):
                    await _record(u, state="cancelled")
                    return
                error = await self._attempt(u, attempt)
                if error is None:
                    await _record(u, state="exited")
                    observer.finished(unit.items)
                    return
                if await anyio.to_thread.run_sync(
                    _local_records.cancelled_elsewhere, job.paths.root, job.job_id, unit.index
                ):
                    observer.failed(
                        unit.items,
                        AscendError(
                            f"{job.name} (job {job.job_id}) was cancelled by another process "
                            f"(ascend jobs cancel {job.job_id}): its runner was stopped."
                        ),
                    )
                    return
                retryable = not isinstance(error, VersionMismatch) and not (
                    isinstance(error, WorkerFailed)
                    and error.exit_code in protocol.ExitCode.reserved()
                )
                if not retryable or attempt + 1 == attempts:
                    await _record(u, state="failed", error=str(error))
                    observer.failed(unit.items, error)
                    return
                await _record(u, state="pending")
                items = f" (items {unit.items.start}-{unit.items.stop - 1})" if job.is_map else ""
                # The error names the call: a sentence, not key=value pairs.
                log.warning(f"attempt {attempt + 1} of {attempts} failed{items}; retrying. {error}")

    async def _attempt(self, u: _Unit, attempt: int) -> AscendError | None:
        """One runner process; returns why it failed, or None when results are published."""
        job, unit, observer = u.job, u.unit, u.observer
        env = {
            # Only the settings of this process pass on, never a runner's own protocol
            # variables (this client may itself run inside a runner: nested calls).
            **{k: v for k, v in os.environ.items() if k not in protocol.RUNNER_ENV},
            **job.resources.env,
            **job.runner_env(unit),
            protocol.ENV_ATTEMPT: f"local-{attempt}",
            protocol.ENV_SKIP_DONE: "1" if attempt else "0",
            "PYTHONUNBUFFERED": "1",
        }
        if not job.settings.detach:
            # The runner dies with this process, however it dies (even SIGKILL).
            env[protocol.ENV_CLIENT_PID] = str(os.getpid())
        command = _RUNNER
        if job.environment is not None:
            # A plain interpreter: isolated (-I) and without site-packages (-S), so the
            # call sees only its environment, as in a pod started from a stock image.
            command = [sys.executable, "-I", "-S", "-u", _bootstrap.__file__]
            env.setdefault(protocol.ENV_ENV_CACHE, str(_config._cache_home() / "ascend" / "envs"))
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
                    _detached(command) if detach_log else command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        finally:
            if detach_log:
                sink.close()
        # Shielded as the spawn is: a cancel is delivered inside the try that stops it.
        with anyio.CancelScope(shield=True):
            await _record(
                u,
                state="running",
                pid=process.pid,
                token=await anyio.to_thread.run_sync(_local_records.process_token, process.pid),
                attempt=attempt,
            )
        u.spawned.one(unit.index)
        observer.started(unit.items)
        output = _Output(unit.items.start, observer, deque(maxlen=_TAIL_LINES))
        # The runner stops the function itself once it has run its timeout (exit
        # DEADLINE), and the bootstrap gives up on a slow environment fetch after
        # startup_timeout (exit STARTUP_TIMEOUT): this bound only catches a runner that
        # could not stop itself (its timer thread starved by code holding the GIL).
        timeout = job.resources.timeout * len(unit.items) if job.resources.timeout else None
        if timeout is not None:
            timeout += _BACKSTOP + (job.settings.startup_timeout if job.environment else 0.0)
        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tg:
                    if process.stdout is not None:
                        tg.start_soon(output.pump, process.stdout)
                    code = await process.wait()
                    # The call resolves when its runner exits: whatever the function left
                    # running in the runner's process group (a background child) is
                    # stopped, and output still held by an escaped one is not waited for.
                    _kill_group(process.pid)
                    tg.cancel_scope.deadline = anyio.current_time() + _DRAIN_GRACE
        except TimeoutError:
            with anyio.CancelScope(shield=True):
                await _stop(process)
            return _diagnosis.deadline_error(
                f"{job.name} (job {job.job_id})", job.resources.timeout
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
                    data = await anyio.to_thread.run_sync(_read_output, detach_log)
                output.feed(data)
                output.end()
        return _diagnose(job, code, output.tail)


class _Output(ItemOutput):
    """A runner's output from its pipe."""

    async def pump(self, stream: AsyncIterator[bytes]) -> None:
        async for chunk in stream:
            self.feed(chunk)
            await self.room()
        self.end()


def _diagnose(job: Job, code: int, tail: deque[str]) -> AscendError | None:
    """The same diagnosis as the Kubernetes backend's (``backends._diagnosis``)."""
    return _diagnosis.exit_error(
        f"{job.name} (job {job.job_id})",
        code,
        logs="\n".join(tail),
        message=_diagnosis.runner_reason(tail),
        timeout=job.resources.timeout,
        startup_timeout=job.settings.startup_timeout,
    )


@dataclasses.dataclass(frozen=True)
class _Unit:
    """One work unit of a job being run, and what its attempts share."""

    job: Job
    unit: WorkUnit
    observer: JobObserver
    own: anyio.CapacityLimiter  # the job's own max_parallel, over all its units
    spawned: _Spawned


class _Spawned:
    """Counts units whose first process started (or that never will); tells the
    observer when all have, which makes a detached job durable."""

    def __init__(self, units: int, observer: JobObserver) -> None:
        self._left = units
        self._seen: set[int] = set()
        self._observer = observer

    def one(self, unit: int) -> None:
        if unit not in self._seen:
            self._seen.add(unit)
            if len(self._seen) == self._left:
                self._observer.submitted()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


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


async def _record(u: _Unit, **fields: Any) -> None:
    """Replace the unit's run record (see ``_local_records``)."""
    await anyio.to_thread.run_sync(
        functools.partial(
            _local_records.write,
            u.job.paths.root,
            u.job.job_id,
            u.unit.index,
            detached=u.job.settings.detach,
            **fields,
        )
    )


def _detach_log_path(job: Job, unit: WorkUnit) -> str:
    folder = _local_records.folder(job.paths.root, job.job_id)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"output-{unit.index}.log")


def _read_output(path: str) -> bytes:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read()
    return b""
