"""Backends run jobs: they start the runner somewhere and report what happens.

A backend implements :class:`Backend`. The scheduler has already uploaded the job's
package and inputs; the backend starts the runner for each work unit, tells the
:class:`JobObserver` about output lines, starts, published results and failures, and
returns when every unit is accounted for. Cancelling the task that runs
:meth:`Backend.run` must stop the remote work; :meth:`JobObserver.until_unwanted` tells
when one unit's (or one map item's) work is to be stopped while the others go on.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ascend._config import Settings
from ascend._console import console
from ascend._errors import AscendError, ConfigError
from ascend._resources import Resources
from ascend._storage import JobPaths
from ascend_runner import protocol
from ascend_runner.framing import LineFramer

if TYPE_CHECKING:
    from ascend._environments import Environment, EnvironmentSpec


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
    environment_spec: EnvironmentSpec | None = None
    """The environment the runner needs built (``None``: the backend's own interpreter
    or image); the scheduler builds or finds it before :meth:`Backend.run`."""
    environment: Environment | None = None
    """The built environment: the runner starts through the bootstrap, which fetches
    it from ``environment_url``."""
    environment_url: str | None = None
    """Where the bootstrap fetches the archive (a path, or a presigned HTTPS URL)."""

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
        if self.environment is not None and self.environment_url is not None:
            env[protocol.ENV_ENV_URL] = self.environment_url
            env[protocol.ENV_ENV_SHA256] = self.environment.sha256
            env[protocol.ENV_STARTUP_TIMEOUT] = f"{self.settings.startup_timeout:g}"
        if self.resources.timeout is not None:
            # The runner bounds its own run, from its start: time spent before it (a
            # pod's scheduling, image pull, environment fetch) is startup_timeout's.
            env[protocol.ENV_RUN_TIMEOUT] = f"{self.resources.timeout * len(unit.items):g}"
        if self.is_map:
            env[protocol.ENV_INPUT_URI] = self.paths.input("{index}")
            env[protocol.ENV_RESULTS_URI] = self.paths.results
            env[protocol.ENV_INDEX] = str(unit.index)
        else:
            env[protocol.ENV_RESULT_URI] = self.paths.result
        return env


class JobObserver(Protocol):
    """How a backend reports progress; implemented by the scheduler."""

    def log(self, item: int, lines: list[str]) -> None:
        """Lines of output from the item's runner, in order (each without its newline)."""

    def started(self, items: range) -> None:
        """The runner for these items started."""

    def finished(self, items: range) -> None:
        """These items' results (values or exceptions) are published."""

    def failed(self, items: range, error: AscendError) -> None:
        """These items will not get a result, for the reason given."""

    def wanted(self, items: range) -> bool:
        """False when every one of these items was cancelled: skip or stop them."""

    async def until_unwanted(self, items: range) -> None:
        """Returns once these items are all done and one of them was cancelled: the
        backend then stops their work (a unit's process, a map index's pod) and reports
        nothing more about them. Await it alongside each unit's work."""

    async def next_cancelled(self) -> int:
        """The next map item (index) whose future is cancelled, waiting for one. A
        backend that follows a whole job in one task (Kubernetes) uses it with
        :meth:`wanted` to stop the work of a unit nobody waits for any more."""

    def submitted(self) -> None:
        """The job's remote work now exists independently of this process (a Job
        object was created, a detached process started): a ``detach=True`` call is
        durable from here on, and the client may exit."""

    def output_copies(self, items: range, urls: list[str]) -> None:
        """These items' output was not streamed; the runner's copies are at ``urls``
        (one per attempt, oldest first). Reported before the items' outcome."""

    def output_on_request(self, follow: Callable[[int], None]) -> None:
        """Output is not streamed unless asked for: ``follow(item)``, called on the
        loop, starts streaming that item's output (when someone reads its logs)."""


CONSOLE_BACKLOG = 8 << 20  # characters of streamed output waiting to be printed


class ItemOutput:
    """Cuts a runner's output into lines per map item, reports them, and keeps a tail.

    Fed the output's bytes in pieces of any size (see :mod:`ascend_runner.framing`);
    lines go to the observer in batches, one call per piece and item.
    """

    def __init__(self, first_item: int, observer: JobObserver, tail: deque[str]) -> None:
        self._observer = observer
        self._framer = LineFramer(first_item)
        self.tail = tail

    def feed(self, data: bytes) -> None:
        """More of the output."""
        self._deliver(self._framer.feed(data))

    def end(self) -> None:
        """The output is over: a last line without a newline is delivered too."""
        self._deliver(self._framer.end())

    async def room(self) -> None:
        """Wait while the console is far behind with printing: the runner then waits on
        its pipe (or the log stream on its reader), as with a plain pipe to a slow
        terminal, instead of the backlog growing in this process's memory."""
        if console.backlog > CONSOLE_BACKLOG:
            await console.printed(patience=None)

    def _deliver(self, batches: list[tuple[int, list[str]]]) -> None:
        for item, lines in batches:
            if lines:
                self.tail.extend(lines[-(self.tail.maxlen or len(lines)) :])
                self._observer.log(item, lines)


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
