"""``@ascend.remote`` and the functions it makes."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import re
import secrets
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, ParamSpec, TypeVar, overload

from ascend import _bridge, _config, _environments, _serialization
from ascend._errors import ConfigError
from ascend._future import Future, MapFuture
from ascend._progress import ProgressCallback, Tracker
from ascend._resources import Resources
from ascend._scheduler import Submission, get_scheduler
from ascend._storage import JobPaths
from ascend.backends import Job, WorkUnit
from ascend_runner import protocol

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


def _callable_name(fn: Any) -> str:
    """``module``-free name of any callable: a function, method, partial or object."""
    name = getattr(fn, "__qualname__", None)
    if isinstance(name, str):
        return name
    if isinstance(fn, functools.partial):
        return _callable_name(fn.func)
    return type(fn).__qualname__


def _refuse_remote(fn: Any) -> None:
    """A remote function made remote again would call itself from inside its runner: a
    nested call whose Future cannot be sent back. Say so when decorating."""
    inner = fn.func if isinstance(fn, functools.partial) else fn
    if isinstance(inner, RemoteFunction):
        raise TypeError(
            f"@ascend.remote cannot wrap {_callable_name(fn)}: it is already remote (an "
            "ascend.RemoteFunction), so each call would start a second, nested call from "
            "inside its runner. Fix: apply @ascend.remote once; to change its resources use "
            f"{_callable_name(fn)}.options(...), and to run it here call its original "
            "function (its __wrapped__)."
        )


def _refuse_generator(fn: Any) -> None:
    """A generator cannot be sent back; say so when decorating, not after the work ran."""
    call = fn if inspect.isroutine(fn) or isinstance(fn, functools.partial) else fn.__call__
    if inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call):
        kind = "an async generator" if inspect.isasyncgenfunction(call) else "a generator"
        raise TypeError(
            f"@ascend.remote cannot run {_callable_name(fn)}: it is {kind} function, whose "
            "items would be made lazily in a process that ends when the call returns. Fix: "
            "return a list instead (collect the items with list(...) or a list comprehension)."
        )


class RemoteFunction(Generic[P, R]):
    """A function whose calls run remotely and return :class:`ascend.Future` objects.

    Made by :func:`ascend.remote`. Calling it submits the call and returns at once.
    The arguments are checked against the function's signature and pickled first, in
    the calling thread: a call Python would refuse raises the same ``TypeError`` (for a
    map, naming the item), and an argument that cannot be pickled raises
    :class:`ascend.SerializationError`, before anything is uploaded or started. The
    arguments are a snapshot: changing them after the call returns (an array reused as
    a buffer) does not change what the call sees.

    Any callable can be remote: a function, an ``async def`` function (the runner
    awaits it), a ``functools.partial``, an object with ``__call__``, a method (it binds
    ``self``: ``Model().predict(x)``), a staticmethod or classmethod.

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
        # ``@ascend.remote`` above ``@staticmethod``/``@classmethod``: remember how the
        # function binds, and behave as that descriptor would (see ``__get__``).
        self._binds: str | None = None
        if isinstance(fn, staticmethod | classmethod):
            self._binds = "class" if isinstance(fn, classmethod) else "static"
            fn = fn.__func__
        if not callable(fn):
            raise TypeError(f"@ascend.remote needs a function, not {fn!r}.")
        _refuse_remote(fn)
        _refuse_generator(fn)
        # A callable object's or partial's own attributes must not shadow ours (map, ...).
        plain = isinstance(fn, types.FunctionType | types.MethodType)
        functools.update_wrapper(self, fn, updated=functools.WRAPPER_UPDATES if plain else ())
        self._resources = resources
        self._signature: inspect.Signature | bool | None = False  # False: not looked up yet

    def __get__(self, instance: Any, owner: type | None = None) -> RemoteFunction[Any, R]:
        """Bind like the function would: ``Model().predict(x)`` passes the instance as
        ``self``; a classmethod gets the class, a staticmethod nothing."""
        if self._binds == "static":
            return self
        if self._binds == "class":
            target = owner if owner is not None else type(instance)
        elif instance is None:
            return self
        else:
            target = instance
        # Bind as the wrapped callable would: a function binds, a partial or a callable
        # object does not (as in a plain class body).
        get = getattr(type(self.__wrapped__), "__get__", None)
        if get is None:
            return self
        bound = get(self.__wrapped__, target, type(target) if self._binds else owner)
        return self if bound is self.__wrapped__ else RemoteFunction(bound, self._resources)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through the runner's protocol module: a class shipped by value keeps its
        # remote methods as attributes, and the runner image may not have ascend.
        options = {f.name: getattr(self._resources, f.name) for f in dataclasses.fields(Resources)}
        options["env"] = dict(options["env"])
        return (protocol.remote_function, (self.__wrapped__, options, self._binds))

    def _check_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], item: int | None = None
    ) -> None:
        """Raise the ``TypeError`` Python would for arguments the signature refuses."""
        if self._signature is False:
            try:
                self._signature = inspect.signature(self.__wrapped__)
            except (TypeError, ValueError):  # no signature to check (some builtins)
                self._signature = None
        if not isinstance(self._signature, inspect.Signature):
            return
        at = "" if item is None else f" (map item {item})"
        params = self._signature.parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            # Named first, as Python does: a misspelt keyword is the mistake to report,
            # not the parameter it left missing.
            names = {p.name for p in params if p.kind not in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)}
            unknown = next((name for name in kwargs if name not in names), None)
            if unknown is not None:
                raise TypeError(
                    f"{self._name}(){at}: got an unexpected keyword argument {unknown!r}"
                )
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self._name}(){at}: {exc}") from None

    @property
    def resources(self) -> Resources:
        """The options this function runs with."""
        return self._resources

    @property
    def _name(self) -> str:
        return _callable_name(self.__wrapped__)

    def __repr__(self) -> str:
        return f"<ascend.RemoteFunction {self._name} {self._resources}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Submit one call; returns its future immediately."""
        self._check_arguments(args, kwargs)
        settings, backend, key = self._context()
        job_id = _job_id(self._name.rsplit(".", 1)[-1])
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
        job = self._job(
            settings, key, job_id, (WorkUnit(0, range(1)),), is_map=False, backend=backend
        )
        get_scheduler().submit(Submission(job, backend, [fut], package, [], blobs.content))
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
        for item, (args, kwargs) in enumerate(items):
            self._check_arguments(args, kwargs, item)
        settings, backend, key = self._context()
        for name, value in (("chunksize", chunksize), ("max_parallel", max_parallel)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"{name}={value!r} must be a positive integer (or None).")
        job_id = _job_id(self._name.rsplit(".", 1)[-1])
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
            index_of = {id(f): i for i, f in enumerate(futures)}

            def on_item_done(item: Any) -> None:
                # Read now, in the settling thread; report on the output thread, in order
                # with printed lines (progress is user code and display: never on the loop).
                _bridge.output.submit(
                    functools.partial(
                        tracker.item_done,
                        index_of[id(item)],
                        "cancelled"
                        if item.cancelled()
                        else "failed"
                        if item.exception(0) is not None
                        else "done",
                    )
                )

        result: MapFuture[R] = MapFuture(
            job_id,
            self._name,
            futures,
            return_exceptions=return_exceptions,
            on_item_done=on_item_done,
        )
        if n:
            job = self._job(
                settings,
                key,
                job_id,
                units,
                is_map=True,
                max_parallel=max_parallel,
                backend=backend,
            )
            get_scheduler().submit(
                Submission(job, backend, futures, package, inputs, blobs.content, tracker)
            )
        return result

    def _job(
        self,
        settings: _config.Settings,
        key: bytes,
        job_id: str,
        units: tuple[WorkUnit, ...],
        *,
        is_map: bool,
        max_parallel: int | None = None,
        backend: str,
    ) -> Job:
        """The job as the backend sees it (its paths, resources, work units and
        environment)."""
        # Read here, in the caller's thread: a bad requirements file or a requirement that
        # conflicts with the runner fails at the call site.
        environment_spec = _environments.spec_for_call(settings, self._resources, backend)
        return Job(
            environment_spec=environment_spec,
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

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here, in this process (for debugging: breakpoints work)."""
        return self.__wrapped__(*args, **kwargs)

    def options(self, **overrides: Any) -> RemoteFunction[P, R]:
        """The same function with some options changed (same names as :func:`remote`)."""
        same = RemoteFunction(self.__wrapped__, self._resources.replace(**overrides))
        same._binds = self._binds
        return same

    def _context(self) -> tuple[_config.Settings, str, bytes]:
        settings = _config.current()
        backend = self._resources.backend or settings.backend
        _refuse_unworkable(settings, backend)
        return settings, backend, _serialization.signing_key()


def _rebuild(fn: Any, options: dict[str, Any], binds: str | None) -> RemoteFunction[Any, Any]:
    """Unpickle a :class:`RemoteFunction` (see ``ascend_runner.protocol.remote_function``)."""
    rebuilt: RemoteFunction[Any, Any] = RemoteFunction(fn, Resources(**options))
    rebuilt._binds = binds
    return rebuilt


def _refuse_unworkable(settings: _config.Settings, backend: str) -> None:
    """Refuse, before anything is uploaded or started, settings the backend cannot use."""
    scheme = settings.storage.split("://", 1)[0] if "://" in settings.storage else "file"
    if scheme == "memory":
        raise ConfigError(
            f"storage {settings.storage!r} lives inside this process, but the {backend} "
            "backend runs each call in another process"
            + (" on another machine" if backend == "kubernetes" else "")
            + ", which cannot read it. Fix: use a file:// path"
            + (
                " every node mounts, or an object store URL (s3://, gs://, az://)."
                if backend == "kubernetes"
                else " or an object store URL."
            )
        )


@overload
def remote(fn: Callable[P, R], /) -> RemoteFunction[P, R]: ...


@overload
def remote(
    *,
    gpu: int | str | Sequence[str] = 0,
    gpu_memory: str | None = None,
    cpu: float | str | None = None,
    memory: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    requirements: Iterable[str] | str | os.PathLike[str] = (),
    image: str | None = None,
    base_image: str | None = None,
    node_type: str | None = None,
    env: dict[str, str] | None = None,
    backend: str | None = None,
    max_preemptions: int = 3,
) -> Callable[[Callable[P, R]], RemoteFunction[P, R]]: ...


def remote(fn: Callable[P, R] | None = None, /, **options: Any) -> Any:
    """Make a function run remotely: each call returns an :class:`ascend.Future`.

    Usable bare (``@ascend.remote``) or with options:

    Args:
        gpu: GPUs per call (``nvidia.com/gpu`` on Kubernetes): a count (``2``, any
            model), a model (``"H100"``, ``"a100-80gb"``), a model and count
            (``"A100-80GB:2"``), or a list of those in order of preference
            (``["H100", "A100"]``: the first the cluster has). Models are matched against
            the nodes' ``nvidia.com/gpu.product`` labels (GPU Feature Discovery).
        gpu_memory: at least this much memory per GPU (``"40Gi"``), by the nodes'
            ``nvidia.com/gpu.memory`` labels.
        cpu: CPU cores per call (``2``, ``0.5`` or ``"500m"``), request and limit.
        memory: memory per call, a Kubernetes quantity (``"16Gi"``), request and limit.
        timeout: seconds one attempt may run before it is stopped
            (:class:`ascend.DeadlineExceeded`).
        retries: extra attempts after a crash, a lost node or a timeout. An exception
            raised by the function is never retried: it is its answer.
        requirements: pip requirements the function needs (``["torch==2.6"]``), or the
            path of a ``requirements.txt``, ``pyproject.toml`` or ``uv.lock``. They are
            installed, with the runner, into an environment built once per content
            (see docs/environments.md); a failed build raises
            :class:`ascend.ImageBuildError`.
        image: a ready-made runner image (Kubernetes); with ``requirements`` it is the
            base their environment is installed on.
        base_image: the image environments start from (default ``python:X.Y-slim``).
        node_type: a node type named in the configuration
            (``[tool.ascend.node_types.NAME]``: GPU, selector, tolerations), or else run
            on nodes of this ``node.kubernetes.io/instance-type``.
        env: environment variables for the call.
        backend: ``"local"`` or ``"kubernetes"``, overriding the configured backend.
        max_preemptions: times a call (or map item) may be taken off its node by the
            cluster (preemption, eviction, drain, node loss) and run again, without
            counting against ``retries``; one more fails it with :class:`ascend.Preempted`.

    Raises:
        TypeError: ``fn`` is not callable, or is a generator function (return a list).
        ascend.ConfigError: an option is invalid.

    Example::

        @ascend.remote(gpu=1, memory="16Gi", timeout=3600)
        def train(hparams: dict) -> dict: ...
    """
    reqs = options.get("requirements")
    if reqs is not None and not isinstance(reqs, str | os.PathLike):
        options["requirements"] = list(reqs)
    resources = Resources.build(**options)
    if fn is None:
        return lambda f: RemoteFunction(f, resources)
    return RemoteFunction(fn, resources)
