"""The errors ascend raises.

Every error is an :class:`AscendError`::

    AscendError
    ├── ConfigError (also ValueError)     bad configuration or decorator option
    ├── SerializationError                the function, arguments or result cannot be pickled
    ├── StorageError                      object storage unreachable or refusing
    ├── IntegrityError                    a package or result failed its signature check
    ├── VersionMismatch                   client and runner Python/cloudpickle differ
    ├── RemoteError                       a remote exception that cannot be rebuilt exactly
    │                                     (also an instance of its type when that is importable)
    ├── DeadlineExceeded                  the call ran past its ``timeout`` and was stopped
    ├── WorkerFailed                      the process or pod died without publishing a result
    │   ├── OOMKilled                     ... because it exceeded its memory limit
    │   └── Preempted                     ... because the cluster took its node away too often
    ├── ResultMissing                     the work finished but no result was published
    ├── NoSuchJob (also LookupError)      attach found no job of that id
    ├── BlockingWaitError (also RuntimeError)  a blocking wait on ascend's own loop thread
    ├── Unschedulable                     no node can run the call (Kubernetes)
    ├── ImagePullError                    the runner image cannot be pulled (Kubernetes)
    ├── ImageBuildError                   the function's environment could not be built
    ├── StartupTimeout (also TimeoutError)  the call did not start within ``startup_timeout``
    └── PermissionDenied                  Kubernetes RBAC refused a request

``DeadlineExceeded`` is deliberately *not* a ``TimeoutError``: ``fut.result(timeout=5)``
raises the built-in ``TimeoutError`` when the *wait* runs out (the call goes on, wait
again), while ``DeadlineExceeded`` means the *call* was stopped (waiting again gives the
same error). A loop that retries ``result(timeout=...)`` on ``TimeoutError`` therefore ends
when the call is killed. A cancelled call raises ``concurrent.futures.CancelledError``
from ``result()`` (also an ``asyncio.CancelledError`` when awaited).

Exceptions raised by the user's function come back as their own type (``except
KeyError`` works), with the remote traceback attached as ``__cause__``. Arguments that do
not fit the function's signature raise ``TypeError`` at the call site, as a local call
would.
"""

from __future__ import annotations

from typing import Any


class AscendError(Exception):
    """Base class of every error raised by ascend itself."""


class ConfigError(AscendError, ValueError):
    """A setting, decorator option or config file entry is invalid."""


class SerializationError(AscendError):
    """The function, its arguments or its result cannot be pickled or unpickled."""


class StorageError(AscendError):
    """Object storage could not be read or written."""


class IntegrityError(AscendError):
    """A package or result in storage is not what ascend wrote (bad signature or format)."""


class VersionMismatch(AscendError):
    """The runner refused a package made by another Python or cloudpickle version."""


class RemoteError(AscendError):
    """A remote exception that cannot be rebuilt exactly as its original type.

    When the original type is an ``Exception`` subclass defined in a module imported
    here, the error raised is an instance of a subclass of both ``RemoteError`` and that
    type, so ``except ItsType:`` still catches it. Its ``__init__`` has not run; the
    remote exception's attributes that could be pickled are set on it.

    Attributes:
        type_name: the remote exception's ``module.QualName``.
        message: its ``str()``.
        remote_traceback: the formatted remote traceback.
        reason: why it could not be rebuilt exactly (empty if not known).
    """

    def __init__(
        self, type_name: str, message: str, remote_traceback: str, reason: str = ""
    ) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.reason = reason
        self.add_note(f"Remote traceback:\n{remote_traceback.rstrip()}")

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str, str]]:
        return (type(self), (self.type_name, self.message, self.remote_traceback, self.reason))


class DeadlineExceeded(AscendError):
    """The call ran longer than its ``timeout`` (seconds, per attempt) and was stopped.

    Not a ``TimeoutError``: that is what ``fut.result(timeout=...)`` raises when only the
    wait ran out and the call goes on.
    """


class WorkerFailed(AscendError):
    """The process or pod running the call ended without publishing a result.

    Attributes:
        exit_code: the process exit code (128 + N for signal N), if known.
        logs: the last lines of its output.
    """

    def __init__(self, message: str, *, exit_code: int | None = None, logs: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.logs = logs


class OOMKilled(WorkerFailed):
    """The call used more memory than its ``memory`` limit and was killed."""


class Preempted(WorkerFailed):
    """The cluster took the call off its node (preemption, eviction, drain, node loss)
    more than ``max_preemptions`` times. Disruptions never count against ``retries``.

    Attributes:
        preemptions: how many times it was disrupted.
        reasons: the cluster's reason for each (``PreemptionByScheduler``,
            ``EvictionByEvictionAPI``, ``DeletionByTaintManager``, ...), oldest first.
    """

    def __init__(
        self, message: str, *, preemptions: int = 0, reasons: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.preemptions: int = preemptions
        self.reasons: list[str] = list(reasons or [])


class ResultMissing(AscendError):
    """The call's work finished successfully, but no result was published."""


class NoSuchJob(AscendError, LookupError):
    """``Future.attach``/``MapFuture.attach`` found no job of that id under the current
    storage, project and user.

    Attributes:
        job_id: the id asked for.
    """

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_no_such_job, (str(self), self.job_id))


def _no_such_job(message: str, job_id: str) -> NoSuchJob:
    return NoSuchJob(message, job_id=job_id)


class BlockingWaitError(AscendError, RuntimeError):
    """A blocking wait (``fut.result()``, ...) was called on ascend's scheduler loop
    thread, where it could never end."""


class Unschedulable(AscendError):
    """No node can run the call (too many GPUs, no matching node type, ...); carries the
    scheduler's own explanation."""


class ImagePullError(AscendError):
    """The runner image cannot be pulled (wrong name, missing tag, no pull access)."""


class ImageBuildError(AscendError):
    """The function's environment (its ``requirements``) could not be built.

    The call fails; ascend never falls back to another environment.

    Attributes:
        requirement: the requirement the build failed on, when the log names one.
        log: the last lines of the build's output.
    """

    def __init__(self, message: str, *, requirement: str | None = None, log: str = "") -> None:
        super().__init__(message)
        self.requirement = requirement
        self.log = log

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_image_build_error, (str(self), self.requirement, self.log))


def _rebuild_image_build_error(message: str, requirement: str | None, log: str) -> ImageBuildError:
    return ImageBuildError(message, requirement=requirement, log=log)


class StartupTimeout(AscendError, TimeoutError):
    """Everything before the function's first line (building or fetching its environment,
    scheduling, pulling the image) took longer than ``startup_timeout``. Distinct from
    :class:`DeadlineExceeded`, which bounds the function's own run (``timeout``)."""


class PermissionDenied(AscendError):
    """Kubernetes RBAC refused a request; the message names the permissions needed."""


class RemoteTraceback(Exception):
    """Carries a remote traceback's text; attached as ``__cause__`` of re-raised exceptions."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text.rstrip()


def unwrap_group(error: BaseException) -> BaseException:
    """The one error inside (nested) single-error groups, as task groups raise them."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
