"""Backends run jobs: they start the runner somewhere and report what happens.

A backend implements :class:`Backend`. The scheduler has already uploaded the job's
package and inputs; the backend starts the runner for each work unit, tells the
:class:`JobObserver` about output lines, starts, published results and failures, and
returns when every unit is accounted for. Cancelling the task that runs
:meth:`Backend.run` must stop the remote work.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ascend._config import Settings
from ascend._errors import AscendError, ConfigError
from ascend._resources import Resources
from ascend._storage import JobPaths
from ascend_runner import protocol


@dataclass(frozen=True)
class WorkUnit:
    """What one runner process (or pod) does: one call, or one chunk of a map."""

    index: int
    items: range


@dataclass(frozen=True)
class Job:
    """A submitted call or map, as the backend sees it."""

    job_id: str
    name: str
    resources: Resources
    settings: Settings
    paths: JobPaths
    is_map: bool
    units: tuple[WorkUnit, ...]
    signing_key: bytes = field(repr=False)
    max_parallel: int | None = None
    """At most this many units run at once (``None``: no limit beyond the backend's)."""

    @property
    def n_items(self) -> int:
        return sum(len(u.items) for u in self.units)

    def runner_env(self, unit: WorkUnit) -> dict[str, str]:
        """The runner's environment for one unit (see :mod:`ascend_runner.protocol`)."""
        env = {
            protocol.ENV_PACKAGE_URI: self.paths.package,
            protocol.ENV_STORAGE_OPTIONS: json.dumps(dict(self.settings.storage_options)),
            protocol.ENV_SIGNING_KEY: self.signing_key.hex(),
            protocol.ENV_BLOBS_URI: self.settings.blobs,
        }
        if self.is_map:
            env[protocol.ENV_INPUT_URI] = self.paths.input("{index}")
            env[protocol.ENV_RESULTS_URI] = self.paths.results
            env[protocol.ENV_INDEX] = str(unit.index)
        else:
            env[protocol.ENV_RESULT_URI] = self.paths.result
        return env


class JobObserver(Protocol):
    """How a backend reports progress; implemented by the scheduler."""

    def log(self, item: int, line: str) -> None:
        """A line of output from the item's runner."""

    def started(self, items: range) -> None:
        """The runner for these items started."""

    def finished(self, items: range) -> None:
        """These items' results (values or exceptions) are published."""

    def failed(self, items: range, error: AscendError) -> None:
        """These items will not get a result, for the reason given."""

    def wanted(self, items: range) -> bool:
        """False when every one of these items was cancelled: skip or stop them."""

    def output_copies(self, items: range, urls: list[str]) -> None:
        """These items' output was not streamed; the runner's copies are at ``urls``
        (one per attempt, oldest first). Reported before the items' outcome."""

    def output_on_request(self, follow: Callable[[int], None]) -> None:
        """Output is not streamed unless asked for: ``follow(item)``, called on the
        loop, starts streaming that item's output (when someone reads its logs)."""


class ItemOutput:
    """Routes a runner's output lines to the map item that printed them, keeping a tail.

    In a chunk of several items the runner announces each with a marker line
    (:data:`ascend_runner.protocol.ITEM_MARKER`) before running it.
    """

    def __init__(self, first_item: int, observer: JobObserver, tail: deque[str]) -> None:
        self._observer = observer
        self._item = first_item
        self.tail = tail

    def line(self, line: str) -> None:
        if line.startswith(protocol.ITEM_MARKER):
            with contextlib.suppress(ValueError):
                self._item = int(line[len(protocol.ITEM_MARKER) :])
            return
        self.tail.append(line)
        self._observer.log(self._item, line)


class Backend(Protocol):
    """Runs jobs somewhere. See the module docstring for the contract."""

    name: str

    async def run(self, job: Job, observer: JobObserver) -> None:
        """Run every unit of ``job``, reporting through ``observer``."""


def create_backend(settings: Settings, name: str) -> Backend:
    """A new backend instance for ``name`` (the scheduler keeps one per configuration)."""
    if name == "local":
        from ascend.backends._local import LocalBackend

        return LocalBackend(max_workers=settings.max_workers)
    if name == "kubernetes":
        try:
            from ascend.backends._kubernetes import KubernetesBackend
        except ImportError as exc:
            raise ConfigError(
                f"the kubernetes backend needs kubernetes-asyncio: {exc}. "
                "Fix: pip install 'ascend-k8s[kubernetes]'."
            ) from exc
        return KubernetesBackend(settings)
    raise ConfigError(f"backend {name!r} is unknown. Fix: use 'local' or 'kubernetes'.")
