"""``@ascend.remote`` and the functions it makes."""

from __future__ import annotations

import functools
import math
import re
import secrets
from collections.abc import Callable, Iterable
from typing import Any, Generic, ParamSpec, TypeVar, overload

from ascend import _config, _serialization
from ascend._errors import ConfigError
from ascend._future import Future, MapFuture
from ascend._progress import ProgressCallback, Tracker
from ascend._resources import Resources
from ascend._scheduler import _JobRun, get_scheduler
from ascend._storage import JobPaths
from ascend.backends import Job, WorkUnit
from ascend_runner import protocol
from ascend_runner.protocol import Buffer

P = ParamSpec("P")
R = TypeVar("R")

_CHUNKS_PER_WORKER = 4
MAX_CHUNKS = 100_000
"""Runner processes per map: Kubernetes caps an Indexed Job's completions at 100,000."""
INLINE_INPUTS = 1 << 20
"""A map whose inputs pickle to at most this many bytes ships them inside its package:
each pod then reads one object instead of two."""


def _job_id(name: str) -> str:
    """A DNS-1123 label: usable as a Kubernetes Job name and a storage folder."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40].strip("-") or "call"
    return f"{slug}-{secrets.token_hex(5)}"


class RemoteFunction(Generic[P, R]):
    """A function whose calls run remotely and return :class:`ascend.Future` objects.

    Made by :func:`ascend.remote`. Calling it submits the call and returns at once.

    Example::

        @ascend.remote(cpu=2, memory="4Gi")
        def square(x: int) -> int:
            return x * x

        square(3).result()                 # 9
        square.map(range(10)).result()     # [0, 1, 4, ...]
        square.local(3)                    # 9, in this process (debuggers work)
        square.options(memory="8Gi")(3)    # same function, other resources
    """

    __wrapped__: Callable[P, R]

    def __init__(self, fn: Callable[P, R], resources: Resources) -> None:
        if not callable(fn):
            raise TypeError(f"@ascend.remote needs a function, not {fn!r}.")
        functools.update_wrapper(self, fn)
        self._resources = resources

    @property
    def resources(self) -> Resources:
        """The options this function runs with."""
        return self._resources

    @property
    def _name(self) -> str:
        return str(getattr(self.__wrapped__, "__qualname__", None) or repr(self.__wrapped__))

    def __repr__(self) -> str:
        return f"<ascend.RemoteFunction {self._name} {self._resources}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Submit one call; returns its future immediately."""
        settings, backend, key = self._context()
        job_id = _job_id(self.__wrapped__.__name__)
        what = f"{self._name}() or its arguments"
        blobs = _serialization.Blobs(settings.blob_threshold)
        shipped_args, shipped_kwargs = blobs.arguments(args, kwargs, what)
        package = _serialization.encode(
            "package",
            {"fn": self.__wrapped__, "args": shipped_args, "kwargs": shipped_kwargs},
            what,
            key,
            blobs,
        )
        fut: Future[R] = Future(job_id, self._name)
        self._submit(
            settings,
            backend,
            key,
            job_id,
            (WorkUnit(0, range(1)),),
            [fut],
            package,
            [],
            blobs,
            is_map=False,
        )
        return fut

    def map(
        self,
        *iterables: Iterable[Any],
        return_exceptions: bool = False,
        chunksize: int | None = None,
        progress: bool | ProgressCallback | None = None,
        max_parallel: int | None = None,
    ) -> MapFuture[R]:
        """Call the function once per item of ``zip(*iterables)``; one future for all.

        Args:
            return_exceptions: put failures in the result list instead of raising the
                first one (which otherwise cancels the remaining items).
            chunksize: items per runner process (default: one per pod on Kubernetes;
                locally, the items spread over about four chunks per worker).
            progress: ``True``/``False`` for the progress bar (default: when interactive),
                or a callable receiving :class:`ascend.Progress` snapshots.
            max_parallel: at most this many runner processes (pods) at once
                (default: as many as the cluster schedules; locally ``max_workers``).
        """
        if not iterables:
            raise TypeError("map() needs at least one iterable of arguments.")
        return self._map(
            [(args, {}) for args in zip(*iterables, strict=False)],
            return_exceptions,
            chunksize,
            progress,
            max_parallel,
        )

    def starmap(
        self,
        iterable: Iterable[Iterable[Any]],
        return_exceptions: bool = False,
        chunksize: int | None = None,
        progress: bool | ProgressCallback | None = None,
        max_parallel: int | None = None,
    ) -> MapFuture[R]:
        """Like :meth:`map`, with each item already a tuple of arguments."""
        return self._map(
            [(tuple(args), {}) for args in iterable],
            return_exceptions,
            chunksize,
            progress,
            max_parallel,
        )

    def _map(
        self,
        items: list[tuple[tuple[Any, ...], dict[str, Any]]],
        return_exceptions: bool,
        chunksize: int | None,
        progress: bool | ProgressCallback | None,
        max_parallel: int | None,
    ) -> MapFuture[R]:
        settings, backend, key = self._context()
        for name, value in (("chunksize", chunksize), ("max_parallel", max_parallel)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"{name}={value!r} must be a positive integer (or None).")
        job_id = _job_id(self.__wrapped__.__name__)
        n = len(items)
        size = chunksize or (
            # One item per pod: Kubernetes spreads them over the nodes.
            1
            if backend == "kubernetes"
            else max(1, math.ceil(n / (settings.max_workers * _CHUNKS_PER_WORKER)))
        )
        if math.ceil(n / size) > MAX_CHUNKS:
            if chunksize is not None:
                raise ConfigError(
                    f"map of {n} items with chunksize={chunksize} needs "
                    f"{math.ceil(n / size)} runner processes; one map allows {MAX_CHUNKS} "
                    f"(the Kubernetes limit on an Indexed Job's completions). Fix: use "
                    f"chunksize={math.ceil(n / MAX_CHUNKS)} or more, or leave it unset."
                )
            size = math.ceil(n / MAX_CHUNKS)
        units = tuple(
            WorkUnit(c, range(start, min(start + size, n)))
            for c, start in enumerate(range(0, n, size))
        )
        blobs = _serialization.Blobs(settings.blob_threshold)
        chunks: list[tuple[str, dict[str, Any]]] = []
        for u in units:
            where = f"the arguments of {self._name}() items {u.items.start}-{u.items.stop - 1}"
            shipped = [blobs.arguments(a, k, where) for a, k in items[u.items.start : u.items.stop]]
            chunks.append((where, {"first": u.items.start, "items": shipped}))
        inputs = [_serialization.encode("input", c, where, key, blobs) for where, c in chunks]
        contents: dict[str, Any] = {"fn": self.__wrapped__}
        if sum(protocol.body_length(parts) for parts in inputs) <= INLINE_INPUTS:
            contents["inputs"] = [chunk for _, chunk in chunks]
            inputs = []
        package = _serialization.encode("package", contents, f"{self._name}()", key, blobs)
        futures: list[Future[R]] = [Future(job_id, f"{self._name}[{i}]") for i in range(n)]
        tracker = Tracker.create(
            n, self._name, progress if progress is not None else settings.progress
        )
        on_item_done = None
        if tracker is not None:

            def on_item_done(item: Any) -> None:
                tracker.item_done(
                    failed=item.cancelled() or item.exception() is not None,
                    was_running=item._status == "running",
                )

        result: MapFuture[R] = MapFuture(
            job_id,
            self._name,
            futures,
            return_exceptions=return_exceptions,
            on_item_done=on_item_done,
        )
        if n:
            self._submit(
                settings,
                backend,
                key,
                job_id,
                units,
                futures,
                package,
                inputs,
                blobs,
                tracker,
                is_map=True,
                max_parallel=max_parallel,
            )
        return result

    def _submit(
        self,
        settings: _config.Settings,
        backend: str,
        key: bytes,
        job_id: str,
        units: tuple[WorkUnit, ...],
        futures: list[Future[R]],
        package: list[Buffer],
        inputs: list[list[Buffer]],
        blobs: _serialization.Blobs,
        tracker: Tracker | None = None,
        *,
        is_map: bool,
        max_parallel: int | None = None,
    ) -> None:
        """Hand the job to the scheduler (a map's inputs may travel in its package)."""
        job = Job(
            job_id=job_id,
            name=self._name,
            resources=self._resources,
            settings=settings,
            paths=JobPaths.of(settings.user_prefix, job_id),
            is_map=is_map,
            units=units,
            signing_key=key,
            max_parallel=max_parallel,
        )
        scheduler = get_scheduler()
        scheduler.submit(
            _JobRun(scheduler, job, backend, futures, package, inputs, tracker, blobs.content)
        )

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here, in this process (for debugging: breakpoints work)."""
        return self.__wrapped__(*args, **kwargs)

    def options(self, **overrides: Any) -> RemoteFunction[P, R]:
        """The same function with some options changed (same names as :func:`remote`)."""
        return RemoteFunction(self.__wrapped__, self._resources.replace(**overrides))

    def _context(self) -> tuple[_config.Settings, str, bytes]:
        settings = _config.current()
        backend = self._resources.backend or settings.backend
        return settings, backend, _serialization.signing_key()


@overload
def remote(fn: Callable[P, R], /) -> RemoteFunction[P, R]: ...


@overload
def remote(
    *,
    gpu: int = 0,
    cpu: float | str | None = None,
    memory: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    requirements: Iterable[str] = (),
    image: str | None = None,
    node_type: str | None = None,
    env: dict[str, str] | None = None,
    backend: str | None = None,
) -> Callable[[Callable[P, R]], RemoteFunction[P, R]]: ...


def remote(fn: Callable[P, R] | None = None, /, **options: Any) -> Any:
    """Make a function run remotely: each call returns an :class:`ascend.Future`.

    Usable bare (``@ascend.remote``) or with options:

    Args:
        gpu: GPUs per call (``nvidia.com/gpu`` on Kubernetes).
        cpu: CPU cores per call (``2``, ``0.5`` or ``"500m"``), request and limit.
        memory: memory per call, a Kubernetes quantity (``"16Gi"``), request and limit.
        timeout: seconds one attempt may run before it is stopped
            (:class:`ascend.DeadlineExceeded`).
        retries: extra attempts after a crash, a lost node or a timeout. An exception
            raised by the function is never retried: it is its answer.
        requirements: pip requirements the function needs (``["torch==2.6"]``).
        image: the runner image (Kubernetes).
        node_type: run on nodes of this ``node.kubernetes.io/instance-type``.
        env: environment variables for the call.
        backend: ``"local"`` or ``"kubernetes"``, overriding the configured backend.

    Example::

        @ascend.remote(gpu=1, memory="16Gi", timeout=3600)
        def train(hparams: dict) -> dict: ...
    """
    if "requirements" in options and options["requirements"] is not None:
        options["requirements"] = list(options["requirements"])
    resources = Resources.build(**options)
    if fn is None:
        return lambda f: RemoteFunction(f, resources)
    return RemoteFunction(fn, resources)
