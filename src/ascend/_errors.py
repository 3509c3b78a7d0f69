"""The errors ascend raises.

Every error is an :class:`AscendError`::

    AscendError
    ├── ConfigError (also ValueError)     bad configuration or decorator option
    ├── SerializationError                the function or its arguments cannot be pickled
    ├── StorageError                      object storage unreachable or refusing
    ├── IntegrityError                    a package or result failed its signature check
    ├── VersionMismatch                   client and runner Python/cloudpickle differ
    ├── RemoteError                       a remote exception whose type cannot be rebuilt here
    ├── DeadlineExceeded (also TimeoutError)  the call ran past its ``timeout``
    ├── WorkerFailed                      the process or pod died without publishing a result
    │   └── OOMKilled                     ... because it exceeded its memory limit
    ├── ResultMissing                     the work finished but no result was published
    ├── Unschedulable                     no node can run the call (Kubernetes)
    ├── ImagePullError                    the runner image cannot be pulled (Kubernetes)
    └── PermissionDenied                  Kubernetes RBAC refused a request

Exceptions raised by the user's function come back as their own type (``except
KeyError`` works), with the remote traceback attached as ``__cause__``.
"""

from __future__ import annotations


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
    """A remote exception that cannot be rebuilt as its original type.

    Attributes:
        type_name: the remote exception's ``module.QualName``.
        message: its ``str()``.
        remote_traceback: the formatted remote traceback.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.add_note(f"Remote traceback:\n{remote_traceback.rstrip()}")

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class DeadlineExceeded(AscendError, TimeoutError):
    """The call ran longer than its ``timeout`` and was stopped."""


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


class ResultMissing(AscendError):
    """The call's work finished successfully, but no result was published."""


class Unschedulable(AscendError):
    """No node can run the call (too many GPUs, no matching node type, ...); carries the
    scheduler's own explanation."""


class ImagePullError(AscendError):
    """The runner image cannot be pulled (wrong name, missing tag, no pull access)."""


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
