"""What a runner's exit means, the same on every backend.

The local backend sees a process's return code (negative for a signal) and its output;
the Kubernetes backend sees a container's ``terminated`` state (exit code, reason,
termination message) and the output it streamed. Both ask :func:`exit_error` what the
caller should be told, and :func:`deadline_error` how to word a timeout, so a failure
reads the same wherever it ran.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable

from ascend._errors import (
    AscendError,
    DeadlineExceeded,
    OOMKilled,
    StartupTimeout,
    VersionMismatch,
    WorkerFailed,
)
from ascend_runner import protocol


def runner_reason(lines: Iterable[str]) -> str:
    """The runner's own last diagnostic line (``ascend-runner: ...``), without prefix."""
    reason = ""
    for line in lines:
        if line.startswith(protocol.DIAGNOSTIC_PREFIX):
            reason = line[len(protocol.DIAGNOSTIC_PREFIX) :]
    return reason


def published(code: int) -> bool:
    """True when the runner published a result (a value or the function's exception)."""
    return code in (protocol.ExitCode.OK, protocol.ExitCode.USER_EXCEPTION)


def retryable(error: AscendError) -> bool:
    """Whether running the same work again could end differently."""
    if isinstance(error, VersionMismatch):
        return False
    return not (isinstance(error, WorkerFailed) and error.exit_code in protocol.ExitCode.reserved())


def _last_output(logs: str) -> str:
    """The end of an error message that shows the process's last output, if it had any."""
    return f" Last output:\n{logs}" if logs.strip() else " It printed nothing."


def deadline_error(
    where: str, timeout: float | None, *, from_start: bool = False
) -> DeadlineExceeded:
    """The error of a call stopped for running past its ``timeout`` (seconds per call).

    ``from_start``: the runner itself stopped the function, its ``timeout`` counted from
    the runner's start (time spent starting is ``startup_timeout``'s, reported apart as
    :class:`StartupTimeout`)."""
    limit = f"its timeout of {timeout:g} s per call" if timeout else "its deadline"
    counted = " (counted from the runner's start)" if from_start else ""
    return DeadlineExceeded(
        f"{where} ran past {limit}{counted} and was stopped. Fix: raise timeout=... or give "
        "it less work per call."
    )


def startup_error(where: str, startup_timeout: float | None, waiting_for: str) -> StartupTimeout:
    """The error of a call whose function did not start within ``startup_timeout``
    (seconds); ``waiting_for`` says what it was still waiting for."""
    limit = f"startup_timeout={startup_timeout:g} s" if startup_timeout else "startup_timeout"
    return StartupTimeout(
        f"{where} did not start within {limit}: {waiting_for}. Its timeout was not "
        "touched: the function never ran. Fix: raise startup_timeout=... (or "
        "ASCEND_STARTUP_TIMEOUT), or remove the cause (a slow image pull: a smaller or "
        "pre-pulled image; a slow environment fetch: a closer store or registry mode)."
    )


def exit_error(
    where: str,
    code: int,
    *,
    logs: str = "",
    message: str = "",
    oom: bool = False,
    memory: str | None = None,
    reason: str = "",
    timeout: float | None = None,
    startup_timeout: float | None = None,
) -> AscendError | None:
    """Why a runner that exited with ``code`` published no result, or ``None`` if it did.

    Args:
        where: names the call, e.g. ``"train (job train-1f2e3d4c5b)"`` or a pod in it.
        code: the exit code; negative for a process killed by a signal (local), or
            128 + N as a container reports a signal.
        logs: the last lines of its output, newline-joined.
        message: what the runner said about its failure (a container's termination
            message, or the runner's last diagnostic line).
        oom: the kernel killed it for exceeding its memory limit.
        memory: the memory limit asked for, for the message.
        reason: the platform's word for the exit (a container's ``reason``), if any.
        timeout: the call's ``timeout`` (seconds per call), for the message.
        startup_timeout: the call's ``startup_timeout`` (seconds), for the message.
    """
    if published(code):
        return None
    message = message.strip()
    if oom:
        return OOMKilled(
            f"{where} was killed for exceeding its memory limit of "
            f"{memory or 'the namespace default'} (OOMKilled). Fix: raise memory=... or use "
            "less memory per call.",
            exit_code=code,
            logs=logs,
        )
    if code == protocol.ExitCode.DEADLINE:
        return deadline_error(where, timeout, from_start=True)
    if code == protocol.ExitCode.STARTUP_TIMEOUT:
        return startup_error(
            where,
            startup_timeout,
            message.removeprefix("startup timeout: ")
            or "fetching and unpacking its environment did not finish",
        )
    if code == protocol.ExitCode.VERSION_MISMATCH:
        return VersionMismatch(f"{where}: the runner refused the package: {message}")
    if code == protocol.ExitCode.TERMINATED:
        return WorkerFailed(
            f"{where}: the runner was terminated (SIGTERM: a cancel, an eviction, a deleted "
            f"pod, or its client died) and published nothing.{_last_output(logs)}",
            exit_code=code,
            logs=logs,
        )
    if code in protocol.ExitCode.reserved():
        meaning = protocol.ExitCode(code).name.lower().replace("_", " ")
        return WorkerFailed(
            f"{where}: the runner failed ({meaning}, exit code {code}): {message}",
            exit_code=code,
            logs=logs,
        )
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return WorkerFailed(
            f"{where}: the runner process was killed by {name} without publishing a result. "
            f"{_last_output(logs).lstrip()}",
            exit_code=128 - code,
            logs=logs,
        )
    how = f"exit code {code}" + (f" ({reason})" if reason else "")
    if code > 128 and code - 128 in signal.valid_signals():
        how += f", signal {signal.Signals(code - 128).name}"
    return WorkerFailed(
        f"{where} failed with {how} without publishing a result.{_last_output(logs)}",
        exit_code=code,
        logs=logs,
    )
