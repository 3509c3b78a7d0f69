"""ascend: run ordinary Python functions on Kubernetes and get futures back.

Example::

    import ascend

    @ascend.remote(gpu=1, memory="16Gi", timeout=3600)
    def train(hparams: dict) -> dict: ...

    fut = train({"lr": 3e-4})      # an ascend.Future, returned at once
    metrics = fut.result()         # or: metrics = await fut
    scores = train.map(grid).result()
"""

from ascend._config import Settings, configure
from ascend._errors import (
    AscendError,
    BlockingWaitError,
    ConfigError,
    DeadlineExceeded,
    ImageBuildError,
    ImagePullError,
    IntegrityError,
    NoSuchJob,
    OOMKilled,
    PermissionDenied,
    Preempted,
    RemoteError,
    ResultMissing,
    SerializationError,
    StartupTimeout,
    StorageError,
    Unschedulable,
    VersionMismatch,
    WorkerFailed,
)
from ascend._future import Future, LogStream, MapFuture, as_completed, gather, wait
from ascend._progress import Progress
from ascend._remote import RemoteFunction, remote
from ascend._resources import Resources

__version__ = "0.1.0"

__all__ = [
    "AscendError",
    "BlockingWaitError",
    "ConfigError",
    "DeadlineExceeded",
    "Future",
    "ImageBuildError",
    "ImagePullError",
    "IntegrityError",
    "LogStream",
    "MapFuture",
    "NoSuchJob",
    "OOMKilled",
    "PermissionDenied",
    "Preempted",
    "Progress",
    "RemoteError",
    "RemoteFunction",
    "Resources",
    "ResultMissing",
    "SerializationError",
    "Settings",
    "StartupTimeout",
    "StorageError",
    "Unschedulable",
    "VersionMismatch",
    "WorkerFailed",
    "as_completed",
    "configure",
    "gather",
    "remote",
    "wait",
]

# Public objects say ``ascend.X`` in reprs, tracebacks and docs, not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("ascend."):
        _obj.__module__ = "ascend"
del _name, _obj
