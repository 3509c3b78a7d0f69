"""The scheduler: one event loop in a daemon thread runs every job's I/O.

Callers never run ascend's I/O on their own loop or thread: a plain script, a thread
pool, ``asyncio.run`` and a Jupyter kernel all hand work to this loop (with
``asyncio.run_coroutine_threadsafe``) and get futures back. At interpreter exit,
calls still running are cancelled and their processes stopped, unless they were
submitted with ``detach=True``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import datetime
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio

from ascend import _serialization
from ascend._config import Settings
from ascend._errors import AscendError, ResultMissing, unwrap_group
from ascend._future import Future, MapFuture
from ascend._logging import logger
from ascend._progress import Tracker
from ascend._resources import Resources
from ascend._storage import JobPaths, Storage
from ascend.backends import Backend, Job, WorkUnit, create_backend
from ascend_runner import protocol

log = logger

_SHUTDOWN_TIMEOUT = 10.0
_OUTPUT_READ_TIMEOUT = 60.0  # reading a stored output copy or a job's meta.json


class _JobRun:
    """One submitted job on the loop: upload, run on the backend, collect results.

    It is the backend's :class:`~ascend.backends.JobObserver`.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        job: Job,
        backend_name: str,
        futures: Sequence[Future[Any]],
        package: list[protocol.Buffer],
        inputs: Sequence[list[protocol.Buffer]],
        tracker: Tracker | None,
        blobs: Mapping[str, memoryview] | None = None,
        *,
        attach: bool = False,
    ) -> None:
        self._attach = attach
        self._scheduler = scheduler
        self.job = job
        self._backend_name = backend_name
        self._futures = list(futures)
        self._package: list[protocol.Buffer] | None = package
        self._inputs: Sequence[list[protocol.Buffer]] | None = inputs
        self._blobs = dict(blobs or {})
        self._copies: dict[int, tuple[int, list[str]]] = {}
        self._tracker = tracker
        self._handle: concurrent.futures.Future[None] | None = None
        self._cancel_requested = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._storage: Storage | None = None
        self.stopped = threading.Event()
        self._output_follow: Callable[[int], None] | None = None
        self._output_wanted: set[int] = set()
        for i, fut in enumerate(self._futures):
            fut._cancel_hook = self._item_cancelled
            if job.is_map:
                fut._log_request = functools.partial(self._want_output, i)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = asyncio.run_coroutine_threadsafe(self._main(), loop)
        if self._cancel_requested:
            self._handle.cancel()

    def cancel(self) -> None:
        """Cancel every item of the job and stop its remote work."""
        for fut in self._futures:
            fut.cancel()

    def _item_cancelled(self) -> None:
        if all(f.done() for f in self._futures):
            self._cancel_requested = True
            if self._handle is not None:
                self._handle.cancel()

    async def _main(self) -> None:
        self._scheduler._runs.add(self)
        try:
            self._storage = self._scheduler.storage(self.job.settings)
            if self._attach:
                await self._reattach(self._storage)
                return
            backend = self._scheduler.backend(self.job.settings, self._backend_name)
            await self._upload(self._storage)
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await backend.run(self.job, self)
            self._fail_unsettled()
        except Exception as raised:
            error = exc = unwrap_group(raised)
            if not isinstance(exc, AscendError):
                log.exception("job failed unexpectedly", job=self.job.job_id)
                error = AscendError(f"{self.job.name} (job {self.job.job_id}) failed: {exc!r}")
                error.__cause__ = exc
            for i in range(len(self._futures)):
                self._fail(i, error)
        finally:
            for fut in self._futures:
                fut._close_log()
            self._scheduler._runs.discard(self)
            self.stopped.set()

    def _fail_unsettled(self) -> None:
        """A future must never wait forever: the backend is done, so say so."""
        for i in range(len(self._futures)):
            self._fail(
                i,
                AscendError(
                    f"{self.job.name} (job {self.job.job_id}): the {self._backend_name} backend "
                    "finished without reporting an outcome for this call. Its output and "
                    f"files are in {self.job.paths.root}."
                ),
            )

    async def _reattach(self, storage: Storage) -> None:
        """Follow a job another process submitted, from its meta.json and the backend."""
        job = self.job
        meta = await read_meta(storage, job)
        known = {"gpu", "cpu", "memory", "timeout", "retries", "requirements", "image", "node_type"}
        resources = Resources.build(**{k: v for k, v in meta["resources"].items() if k in known})
        self.job = job = dataclasses.replace(job, name=meta["function"], resources=resources)
        backend = self._scheduler.backend(job.settings, meta["backend"])
        async with anyio.create_task_group() as tg:
            self._tg = tg
            attach = getattr(backend, "attach", None)
            if attach is not None:
                await attach(job, self)
            else:
                # Without a cluster to ask, storage tells what has finished.
                done = [
                    i
                    for i in range(job.n_items)
                    if await storage.exists(
                        job.paths.item_result(i) if job.is_map else job.paths.result
                    )
                ]
                for i in done:
                    self.finished(range(i, i + 1))
                if len(done) < job.n_items:
                    self.failed(
                        range(job.n_items),
                        AscendError(
                            f"{job.name} (job {job.job_id}) has no result yet, and the "
                            f"{meta['backend']} backend cannot follow a job started by another "
                            "process. Fix: attach again once it has finished."
                        ),
                    )
        self._fail_unsettled()

    async def _upload(self, storage: Storage) -> None:
        job = self.job
        package, inputs = self._package, self._inputs
        assert package is not None and inputs is not None
        self._package = self._inputs = None  # the bytes are not needed once stored
        hashes = {"package.pkl": _serialization.digest(package)}
        blobs, self._blobs = self._blobs, {}
        async with anyio.create_task_group() as tg:  # before anything that refers to them
            for digest, data in blobs.items():
                tg.start_soon(storage.put_blob, protocol.blob_url(job.settings.blobs, digest), data)
        async with anyio.create_task_group() as tg:
            tg.start_soon(storage.write, job.paths.package, package)
            for index, parts in enumerate(inputs):
                tg.start_soon(storage.write, job.paths.input(index), parts)
        meta = {
            "job_id": job.job_id,
            "function": job.name,
            "kind": "map" if job.is_map else "call",
            "items": job.n_items,
            "chunks": len(job.units),
            "backend": self._backend_name,
            "resources": job.resources.to_json(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(),
            "client": {
                **protocol.runtime_versions(),
                "ascend": _CLIENT_VERSION,
                "platform": sys.platform,
            },
            "hashes": hashes,
            "blobs": sorted(blobs),
            "units": [[u.items.start, u.items.stop] for u in job.units],
        }
        await storage.write_json(job.paths.meta, meta)

    # -- JobObserver -------------------------------------------------------------------

    def log(self, item: int, line: str) -> None:
        fut = self._futures[item]
        fut._log.append(line)
        if self.job.settings.stream_logs is True:
            print(f"[{self._tag(item)}] {line}", flush=True)

    def _tag(self, item: int) -> str:
        return f"{self.job.job_id}#{item}" if self.job.is_map else self.job.job_id

    def _fail(self, item: int, error: BaseException) -> None:
        """Fail one item; with ``stream_logs="failed"``, its output is printed now."""
        fut = self._futures[item]
        if fut.done():
            return
        if self._print_failed:
            tag = self._tag(item)
            lines = fut._log.snapshot()
            print(f"[{tag}] failed: {error!r}" + "".join(f"\n[{tag}] {x}" for x in lines))
        fut._fail(error)

    def started(self, items: range) -> None:
        count = 0
        for i in items:
            if not self._futures[i].done():
                self._futures[i]._set_status("running")
                count += 1
        if self._tracker is not None and count:
            self._tracker.started(count)

    def finished(self, items: range) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._collect, items)

    def failed(self, items: range, error: AscendError) -> None:
        for i in items:
            if self._print_failed and self._futures[i]._log_loader is not None:
                assert self._tg is not None
                self._tg.start_soon(self._fail_with_output, i, error)
            else:
                self._fail(i, error)

    def wanted(self, items: range) -> bool:
        return any(not self._futures[i].done() for i in items)

    def output_copies(self, items: range, urls: list[str]) -> None:
        for i in items:
            self._copies[i] = (items.start, urls)
            self._futures[i]._log_loader = functools.partial(self._load_output, i)

    def output_on_request(self, follow: Callable[[int], None]) -> None:
        self._output_follow = follow
        for item in sorted(self._output_wanted):
            self._output_wanted_on_loop(item)
        self._output_wanted.clear()

    def _want_output(self, item: int) -> None:
        """Someone reads the item's logs (from any thread, possibly before it runs)."""
        loop = self._scheduler._loop
        assert loop is not None
        loop.call_soon_threadsafe(self._output_wanted_on_loop, item)

    def _output_wanted_on_loop(self, item: int) -> None:
        if self._futures[item].done():
            return
        if self._output_follow is None:
            self._output_wanted.add(item)
        else:
            self._output_follow(item)

    @property
    def _print_failed(self) -> bool:
        return self.job.settings.stream_logs == "failed"

    def _load_output(self, item: int) -> list[str]:
        """The item's stored output, read on the loop for a caller in another thread."""
        loop = self._scheduler._loop
        assert loop is not None
        return asyncio.run_coroutine_threadsafe(self._read_output(item), loop).result(
            _OUTPUT_READ_TIMEOUT
        )

    async def _read_output(self, item: int) -> list[str]:
        first, urls = self._copies.get(item, (item, []))
        assert self._storage is not None
        lines: list[str] = []
        for url in urls:
            try:
                data = await self._storage.read(url)
            except (FileNotFoundError, AscendError):
                continue  # a pod killed before it could store its copy
            lines.extend(bytes(data).decode(errors="replace").splitlines())
        return protocol.lines_by_item(lines, first).get(item, [])

    async def _fail_with_output(self, item: int, error: BaseException) -> None:
        """Fail an item whose output is in storage, printing that output first."""
        fut = self._futures[item]
        if fut._log_loader is not None:
            fut._log_loader = None
            fut._set_output(await self._read_output(item))
        self._fail(item, error)

    # -- results -----------------------------------------------------------------------

    async def _collect(self, items: range) -> None:
        async with anyio.create_task_group() as tg:
            for i in items:
                if not self._futures[i].done():
                    tg.start_soon(self._collect_one, i)

    async def _collect_one(self, index: int) -> None:
        job, fut = self.job, self._futures[index]
        assert self._storage is not None
        url = job.paths.item_result(index) if job.is_map else job.paths.result
        where = f"{job.name} (job {job.job_id}{f', item {index}' if job.is_map else ''})"
        try:
            data = await self._storage.read(url)
            status, payload = _serialization.decode(data, f"the result of {where}", job.signing_key)
        except FileNotFoundError:
            self._fail(
                index,
                ResultMissing(
                    f"{where} finished, but no result was published at {url}. Check that "
                    "the runner and this client use the same storage URL."
                ),
            )
            return
        except AscendError as exc:
            self._fail(index, exc)
            return
        if status == "ok":
            fut._resolve(payload)
        elif self._print_failed and fut._log_loader is not None:
            await self._fail_with_output(index, _serialization.rebuild_exception(payload, where))
        else:
            self._fail(index, _serialization.rebuild_exception(payload, where))


async def read_meta(storage: Storage, job: Job) -> dict[str, Any]:
    """A submitted job's meta.json, checked to be the kind of job being attached."""
    try:
        meta: dict[str, Any] = await storage.read_json(job.paths.meta)
    except FileNotFoundError:
        raise AscendError(
            f"no job {job.job_id!r} under {job.settings.user_prefix}. Fix: attach with the "
            "storage, project and user the job was submitted with."
        ) from None
    kind = meta.get("kind")
    if kind != ("map" if job.is_map else "call"):
        other = "MapFuture" if kind == "map" else "Future"
        raise AscendError(
            f"job {job.job_id} is a {kind}. Fix: attach it with ascend.{other}.attach()."
        )
    return meta


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ascend-k8s")
    except PackageNotFoundError:
        return "unknown"


# Read once at import: importlib.metadata stats files, which must not happen on the loop.
_CLIENT_VERSION = _version()


class Scheduler:
    """Owns the loop thread, one storage client per store and one backend per config."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._runs: set[_JobRun] = set()
        self._storages: dict[tuple[str, str], Storage] = {}
        self._backends: dict[tuple[str, int], Backend] = {}
        self._thread = threading.Thread(target=self._serve, name="ascend-scheduler", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _serve(self) -> None:
        anyio.run(self._main, backend="asyncio")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._ready.set()
        await self._stopping.wait()

    def storage(self, settings: Settings) -> Storage:
        key = (settings.storage, repr(sorted(settings.storage_options.items())))
        if key not in self._storages:
            self._storages[key] = Storage(settings.storage, settings.storage_options)
        return self._storages[key]

    def backend(self, settings: Settings, name: str) -> Backend:
        key = (name, settings.max_workers)
        if key not in self._backends:
            self._backends[key] = create_backend(settings, name)
        return self._backends[key]

    def attach(self, job_id: str, settings: Settings) -> Future[Any]:
        """A future for a call submitted earlier, perhaps by another process."""
        fut: Future[Any] = Future(job_id, job_id)
        job = self._attached_job(job_id, settings, is_map=False, units=(WorkUnit(0, range(1)),))
        self.submit(_JobRun(self, job, settings.backend, [fut], [], [], None, attach=True))
        return fut

    def attach_map(
        self, job_id: str, settings: Settings, *, return_exceptions: bool
    ) -> MapFuture[Any]:
        """A map future for a map submitted earlier; reads its meta.json first (blocking)."""
        assert self._loop is not None
        probe = self._attached_job(job_id, settings, is_map=True, units=())
        meta = asyncio.run_coroutine_threadsafe(
            read_meta(self.storage(settings), probe), self._loop
        ).result(_OUTPUT_READ_TIMEOUT)
        units = tuple(WorkUnit(i, range(a, b)) for i, (a, b) in enumerate(meta["units"]))
        name = str(meta["function"])
        futures: list[Future[Any]] = [
            Future(job_id, f"{name}[{i}]") for i in range(int(meta["items"]))
        ]
        job = dataclasses.replace(probe, name=name, units=units)
        self.submit(_JobRun(self, job, settings.backend, futures, [], [], None, attach=True))
        return MapFuture(job_id, name, futures, return_exceptions=return_exceptions)

    @staticmethod
    def _attached_job(
        job_id: str, settings: Settings, *, is_map: bool, units: tuple[WorkUnit, ...]
    ) -> Job:
        return Job(
            job_id=job_id,
            name=job_id,
            resources=Resources(),
            settings=settings,
            paths=JobPaths.of(settings.user_prefix, job_id),
            is_map=is_map,
            units=units,
            signing_key=_serialization.signing_key(),
        )

    def submit(self, run: _JobRun) -> None:
        assert self._loop is not None
        run.start(self._loop)

    @property
    def active_jobs(self) -> int:
        return len(self._runs)

    def shutdown(self, timeout: float = _SHUTDOWN_TIMEOUT) -> None:
        """Cancel running jobs (except detached ones), wait for their cleanup, stop the loop."""
        if self._loop is None or not self._thread.is_alive() or self.pid != os.getpid():
            return
        runs = [r for r in list(self._runs) if not r.job.settings.detach]
        for run in runs:
            try:
                run.cancel()
            except Exception:  # one broken job must not keep the others' processes alive
                log.exception("cancelling at exit failed", job=run.job.job_id)
        deadline = time.monotonic() + timeout
        for run in runs:
            run.stopped.wait(max(deadline - time.monotonic(), 0))
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=2)


_lock = threading.Lock()
_scheduler: Scheduler | None = None


def get_scheduler() -> Scheduler:
    """The process-wide scheduler, started on first use (and again in a forked child)."""
    global _scheduler
    with _lock:
        if _scheduler is None or _scheduler.pid != os.getpid():
            _scheduler = Scheduler()
            # Run before the interpreter shuts down thread pools (as concurrent.futures
            # does): stopping remote work may need them (aiohttp, to_thread).
            register = getattr(threading, "_register_atexit", None)
            if register is not None:
                register(_scheduler.shutdown)
            else:
                atexit.register(_scheduler.shutdown)
        return _scheduler
