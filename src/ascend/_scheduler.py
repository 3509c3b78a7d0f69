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
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio

from ascend import _bridge, _environments, _serialization
from ascend._config import Settings
from ascend._console import console
from ascend._errors import AscendError, NoSuchJob, ResultMissing, unwrap_group
from ascend._future import Future, MapFuture
from ascend._logging import logger
from ascend._progress import Tracker
from ascend._resources import Resources
from ascend._storage import JobPaths, Storage, checked_job_id
from ascend.backends import Backend, Job, WorkUnit, create_backend
from ascend_runner import framing, protocol

log = logger

_SHUTDOWN_TIMEOUT = 10.0
_OUTPUT_READ_TIMEOUT = 60.0  # reading a stored output copy or a job's meta.json


@dataclasses.dataclass(frozen=True)
class Submission:
    """Everything the decorator hands the scheduler for one call or map: one value.

    ``package``/``inputs`` are the encoded envelopes (a map's inputs may travel inside
    its package, then ``inputs`` is empty); ``blobs`` the content-addressed buffers
    they refer to, by digest; ``tracker`` the map's progress reporter, if any.
    """

    job: Job
    backend: str
    futures: Sequence[Future[Any]]
    package: list[protocol.Buffer] = dataclasses.field(default_factory=list)
    inputs: Sequence[list[protocol.Buffer]] = ()
    blobs: Mapping[str, memoryview] = dataclasses.field(default_factory=dict)
    tracker: Tracker | None = None


class _JobRun:
    """One submitted job on the loop: upload, run on the backend, collect results.

    It is the backend's :class:`~ascend.backends.JobObserver` and its futures'
    :class:`~ascend._future.JobControl`: nothing else reaches into either side.
    """

    def __init__(
        self, scheduler: Scheduler, submission: Submission, *, attached: dict[str, Any] | None
    ) -> None:
        """``attached``: the meta.json of a job another process submitted, to follow."""
        self._attached = attached
        self._scheduler = scheduler
        self.job = job = submission.job
        self._backend_name = submission.backend
        self._futures = list(submission.futures)
        self._package: list[protocol.Buffer] | None = submission.package
        self._inputs: Sequence[list[protocol.Buffer]] | None = submission.inputs
        self._blobs = dict(submission.blobs)
        self._copies: dict[int, tuple[int, list[str]]] = {}
        self._printed: dict[int, int] = {}  # item -> console ticket of its last lines
        self._tracker = submission.tracker
        self._handle: concurrent.futures.Future[None] | None = None
        self._cancel_requested = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._storage: Storage | None = None
        self.stopped = threading.Event()
        # Set once an attached job's published results have settled its futures (or it
        # stopped): attach() returns then, so a finished job's futures are done at once.
        self.settled = threading.Event()
        # Set once the remote work exists without this process (see ``submitted()``);
        # only a detached job is waited for at exit (an Event per call costs memory).
        self.durable = threading.Event() if job.settings.detach else None
        self._output_follow: Callable[[int], None] | None = None
        self._output_wanted: set[int] = set()
        self._stored_unread: set[int] = set()  # items whose stored output is not read yet
        self._unwanted: dict[range, asyncio.Event] = {}
        self._cancelled_items: asyncio.Queue[int] | None = None  # made on first wait
        for i, fut in enumerate(self._futures):
            fut._bind(self, i)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = asyncio.run_coroutine_threadsafe(self._main(), loop)
        if self._cancel_requested:
            self._handle.cancel()

    def cancel_all(self) -> None:
        """Cancel every item of the job and stop its remote work."""
        for fut in self._futures:
            fut.cancel()

    # -- JobControl (any thread) -----------------------------------------------------

    def cancel(self, item: int) -> None:
        if all(f.done() for f in self._futures):
            self._cancel_requested = True
            if self._handle is not None:
                self._handle.cancel()
            return
        loop = self._scheduler._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._item_cancelled, item)

    def request_output(self, item: int) -> None:
        """Someone reads the item's logs (from any thread, possibly before it runs)."""
        if not self.job.is_map:
            return
        loop = self._scheduler._loop
        assert loop is not None
        loop.call_soon_threadsafe(self._output_wanted_on_loop, item)

    def stored_output(self, item: int) -> list[str] | None:
        """The item's stored output, read on the loop for a caller in another thread."""
        if item not in self._stored_unread:
            return None
        self._stored_unread.discard(item)
        loop = self._scheduler._loop
        assert loop is not None
        return _bridge.wait(
            asyncio.run_coroutine_threadsafe(self._read_output(item), loop),
            _OUTPUT_READ_TIMEOUT,
            "reading a call's stored output",
        )

    def _item_cancelled(self, item: int) -> None:
        if self._cancelled_items is not None:
            self._cancelled_items.put_nowait(item)
        self._check_unwanted()

    def _check_unwanted(self) -> None:
        for items, event in list(self._unwanted.items()):
            if self._is_unwanted(items):
                event.set()

    def _is_unwanted(self, items: range) -> bool:
        futures = [self._futures[i] for i in items]
        return all(f.done() for f in futures) and any(f.cancelled() for f in futures)

    async def _main(self) -> None:
        try:
            self._storage = self._scheduler.storage(self.job.settings)
            if self._attached is not None:
                await self._reattach(self._storage, self._attached)
                return
            backend = self._scheduler.backend(self.job.settings, self._backend_name)
            if self.job.environment_spec is not None:
                self.job = await _environments.prepare(
                    self.job, self._storage, backend, lambda line: self.log(0, [f"[env] {line}"])
                )
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
            self.submitted()
            self.settled.set()
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

    async def _reattach(self, storage: Storage, meta: dict[str, Any]) -> None:
        """Follow a job another process submitted, from its meta.json and the backend."""
        job = self.job
        known = {"gpu", "gpu_memory", "cpu", "memory", "timeout", "retries", "requirements"}
        known |= {"image", "node_type", "max_preemptions"}
        given = meta.get("resources") or {}
        resources = Resources.build(**{k: v for k, v in given.items() if k in known})
        self.job = job = dataclasses.replace(job, name=meta["function"], resources=resources)
        backend = self._scheduler.backend(job.settings, meta["backend"])
        attach = getattr(backend, "attach", None)
        if attach is None:
            self._local_output_copies()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            # Published results settle first, all of them, before anything is followed:
            # a stored result always wins over "the first failure cancels the rest".
            await self._collect(await self._published(storage))
            if attach is not None:
                await self._followed_output_copies(storage)
            self.settled.set()
            if attach is not None:
                await attach(job, self)
            else:
                # Without a cluster to ask, the runner records say why the rest is missing.
                await self._fail_unpublished(meta["backend"])
        self._fail_unsettled()

    async def _published(self, storage: Storage) -> list[int]:
        """The items that have published a result."""
        job = self.job
        if not job.is_map:
            return [0] if await storage.exists(job.paths.result) else []
        names = await storage.list(job.paths.results)
        return sorted(
            int(stem)
            for name in names
            if name.endswith(".pkl") and (stem := name.removesuffix(".pkl")).isdigit()
        )

    async def _followed_output_copies(self, storage: Storage) -> None:
        """The runners' stored copies of a followed (Kubernetes) job's output, one per
        pod (``{logs}/{pod}.log``), for the units whose items have all published: their
        pods may be gone, so their logs come from there."""
        job = self.job
        try:
            names = await storage.list(job.paths.logs)
        except (FileNotFoundError, AscendError):
            return
        prefix = f"{job.job_id}-"
        copies: dict[int, list[str]] = {}
        for name in sorted(names):
            if not (name.startswith(prefix) and name.endswith(".log")):
                continue
            # An Indexed Job's pods are named {job}-{index}-{suffix}.
            index, _, rest = name.removeprefix(prefix).partition("-")
            number = int(index) if rest and index.isdigit() else 0
            copies.setdefault(number, []).append(f"{job.paths.logs}/{name}")
        for unit in job.units:
            if unit.index in copies and all(self._futures[i].done() for i in unit.items):
                self.output_copies(unit.items, copies[unit.index])

    def _local_output_copies(self) -> None:
        """A detached local runner's output file is the stored copy of its items' output
        (on a ``file://`` store, where the job's folder is)."""
        job = self.job
        if job.paths.root.startswith("file://"):
            for unit in job.units:
                self.output_copies(unit.items, [f"{job.paths.root}/output-{unit.index}.log"])

    async def _fail_unpublished(self, backend: str) -> None:
        from ascend.backends import _local_records

        job = self.job
        records = await anyio.to_thread.run_sync(_local_records.read, job.paths.root, job.job_id)
        states = {
            unit: await anyio.to_thread.run_sync(_local_records.unit_state, record)
            for unit, record in records.items()
        }
        where = f"{job.name} (job {job.job_id})"
        for unit in job.units:
            state = states.get(unit.index)
            error: AscendError
            if state == "live":
                error = AscendError(
                    f"{where} has no result yet: it is still running, started by another "
                    f"process (the {backend} backend follows only jobs that have finished). "
                    "Fix: attach again once it has finished (ascend jobs status "
                    f"{job.job_id}), or use the kubernetes backend to follow jobs from any "
                    "process."
                )
            elif state == "ended":
                error = ResultMissing(
                    f"{where} has no result: its runner ended without publishing one (it ran "
                    "past its timeout, crashed, exited itself or was killed); the process "
                    "that started it had that error. Fix: read its output (ascend jobs logs "
                    f"{job.job_id}) and call again."
                )
            elif state == "cancelled":
                error = AscendError(
                    f"{where} has no result: it was cancelled (by fut.cancel(), ascend jobs "
                    "cancel, or the exit of the process that started it, when not detached). "
                    "Fix: call again."
                )
            else:
                error = AscendError(
                    f"{where} has no result: it is still running in the process that started "
                    f"it (the {backend} backend cannot follow a job started by another "
                    "process), or that process cancelled it or ended before it finished. Fix: "
                    "attach again once it has finished, or use the kubernetes backend to "
                    "follow jobs from any process."
                )
            self.failed(unit.items, error)

    async def _upload(self, storage: Storage) -> None:
        job = self.job
        package, inputs = self._package, self._inputs
        assert package is not None and inputs is not None
        self._package = self._inputs = None  # the bytes are not needed once stored
        hashes = {"package.pkl": _serialization.digest(package)}
        blobs, self._blobs = self._blobs, {}
        async with anyio.create_task_group() as tg:  # before anything that refers to them
            for digest, data in blobs.items():
                url = protocol.blob_url(job.settings.blobs, digest)
                tg.start_soon(storage.put_blob, url, data, digest)
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

    def log(self, item: int, lines: list[str]) -> None:
        fut = self._futures[item]
        fut._log.extend(lines)
        if self.job.settings.stream_logs is True:
            self._printed[item] = console.write_lines(f"[{self._tag(item)}] ", lines)

    def _tag(self, item: int) -> str:
        return f"{self.job.job_id}#{item}" if self.job.is_map else self.job.job_id

    def _fail(self, item: int, error: BaseException) -> None:
        """Fail one item; with ``stream_logs="failed"``, its output is printed now."""
        fut = self._futures[item]
        if fut.done():
            return
        if self._print_failed:
            self._print_failure(item, error)
        fut._fail(error)

    def _print_failure(self, item: int, error: BaseException) -> None:
        tag = self._tag(item)
        lines = self._futures[item]._log.snapshot()
        self._printed[item] = console.write(
            f"[{tag}] failed: {error!r}" + "".join(f"\n[{tag}] {x}" for x in lines) + "\n"
        )

    async def _fail_when_printed(self, item: int, error: BaseException) -> None:
        """Fail one item once its output (streamed, or printed for failing) is written."""
        fut = self._futures[item]
        if fut.done():
            return
        if self._print_failed:
            self._print_failure(item, error)
        # The item's output is on the terminal before its error.
        await console.printed(self._printed.get(item, 0))
        fut._fail(error)

    def started(self, items: range) -> None:
        count = 0
        for i in items:
            if not self._futures[i].done():
                self._futures[i]._set_status("running")
                count += 1
        if self._tracker is not None and count:
            _bridge.output.submit(self._tracker.started, items)  # user code: off the loop

    def finished(self, items: range) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._collect, items)

    def failed(self, items: range, error: AscendError) -> None:
        for i in items:
            if self._print_failed and i in self._stored_unread:
                assert self._tg is not None
                self._tg.start_soon(self._fail_with_output, i, error)
            elif self.job.settings.stream_logs and self._tg is not None:
                self._tg.start_soon(self._fail_when_printed, i, error)
            else:
                self._fail(i, error)

    def wanted(self, items: range) -> bool:
        return any(not self._futures[i].done() for i in items)

    def preempted(self, items: range, count: int, reason: str) -> None:
        """The cluster took these items' pod away (``count`` times so far); they run again."""
        for i in items:
            fut = self._futures[i]
            fut._preemptions = count
            if fut.running():
                fut._set_status("pending")
        if self._tracker is not None:
            self._tracker.preempted(items)

    async def until_unwanted(self, items: range) -> None:
        event = self._unwanted.setdefault(items, asyncio.Event())
        try:
            if self._is_unwanted(items):
                return
            await event.wait()
        finally:
            self._unwanted.pop(items, None)

    async def next_cancelled(self) -> int:
        if self._cancelled_items is None:
            self._cancelled_items = asyncio.Queue()
            for i, fut in enumerate(self._futures):  # those cancelled before anyone asked
                if fut.cancelled():
                    self._cancelled_items.put_nowait(i)
        return await self._cancelled_items.get()

    def submitted(self) -> None:
        if self.durable is not None:
            self.durable.set()

    def output_copies(self, items: range, urls: list[str]) -> None:
        for i in items:
            self._copies[i] = (items.start, urls)
            self._stored_unread.add(i)

    def output_on_request(self, follow: Callable[[int], None]) -> None:
        self._output_follow = follow
        for item in sorted(self._output_wanted):
            self._output_wanted_on_loop(item)
        self._output_wanted.clear()

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

    async def _read_output(self, item: int) -> list[str]:
        first, urls = self._copies.get(item, (item, []))
        assert self._storage is not None
        lines: list[str] = []
        for url in urls:
            try:
                data = await self._storage.read(url)
            except (FileNotFoundError, AscendError):
                continue  # a pod killed before it could store its copy
            lines.extend(framing.lines_by_item(bytes(data), first).get(item, []))
        return lines

    async def _fail_with_output(self, item: int, error: BaseException) -> None:
        """Fail an item whose output is in storage, printing that output first."""
        fut = self._futures[item]
        if item in self._stored_unread:
            self._stored_unread.discard(item)
            fut._set_output(await self._read_output(item))
        await self._fail_when_printed(item, error)

    # -- results -----------------------------------------------------------------------

    async def _collect(self, items: Sequence[int]) -> None:
        """Read the items' results, then settle them: every success before any failure, so
        that a failure read first never cancels an item whose result is already here."""
        read: dict[int, tuple[str, Any]] = {}

        async def one(index: int) -> None:
            read[index] = await self._read_result(index)

        async with anyio.create_task_group() as tg:
            for i in items:
                if not self._futures[i].done():
                    tg.start_soon(one, i)
        for index in sorted(read, key=lambda i: (read[i][0] != "ok", i)):
            await self._settle(index, *read[index])

    async def _read_result(self, index: int) -> tuple[str, Any]:
        """``("ok", value)``, ``("error", payload)`` or ``("fail", AscendError)``."""
        job = self.job
        assert self._storage is not None
        url = job.paths.item_result(index) if job.is_map else job.paths.result
        where = self._where(index)
        try:
            data = await self._storage.read(url)
            status, payload = _serialization.decode(data, f"the result of {where}", job.signing_key)
        except FileNotFoundError:
            return (
                "fail",
                ResultMissing(
                    f"{where} ended without publishing a result at {url}: the function "
                    "ended its process itself (os._exit() or a signal to itself), or its "
                    "process or Job was stopped or deleted outside ascend before it could "
                    "publish. Fix: return from the function instead of exiting; call again. "
                    "(If it did finish, the runner used a storage URL other than this "
                    "client's.)"
                ),
            )
        except AscendError as exc:
            return ("fail", exc)
        return (status, payload)

    def _where(self, index: int) -> str:
        job = self.job
        return f"{job.name} (job {job.job_id}{f', item {index}' if job.is_map else ''})"

    async def _settle(self, index: int, status: str, payload: Any) -> None:
        fut = self._futures[index]
        if self.job.settings.stream_logs is True:
            # The call's output is on the terminal before its outcome.
            await console.printed(self._printed.get(index, 0))
        if status == "fail":
            self._fail(index, payload)
        elif status == "ok":
            fut._resolve(payload)
        else:
            error = _serialization.rebuild_exception(payload, self._where(index))
            if self._print_failed and index in self._stored_unread:
                await self._fail_with_output(index, error)
            else:
                await self._fail_when_printed(index, error)


_META_KEYS = {"function": str, "kind": str, "items": int, "units": list, "backend": str}


async def read_meta(storage: Storage, job: Job) -> dict[str, Any]:
    """A submitted job's meta.json, checked to be the kind of job being attached.

    Raises :class:`NoSuchJob` when there is none, :class:`AscendError` when it is the
    other kind (a map attached as a call, or the reverse) or cannot be read as one.
    """
    try:
        meta: Any = await storage.read_json(job.paths.meta)
    except FileNotFoundError:
        raise NoSuchJob(
            f"no job {job.job_id!r} under {job.settings.user_prefix}. Fix: check the id, "
            "and attach with the storage, project and user the job was submitted with.",
            job_id=job.job_id,
        ) from None
    except ValueError as exc:  # not JSON (or not UTF-8)
        raise _unreadable_meta(job, f"it is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _unreadable_meta(job, f"it holds a {type(meta).__name__}, not an object")
    for key, kind_of in _META_KEYS.items():
        if not isinstance(meta.get(key), kind_of):
            raise _unreadable_meta(job, f"its {key!r} is missing or not a {kind_of.__name__}")
    kind = meta["kind"]
    if kind != ("map" if job.is_map else "call"):
        other = "MapFuture" if kind == "map" else "Future"
        raise AscendError(
            f"job {job.job_id} is a {kind}. Fix: attach it with ascend.{other}.attach()."
        )
    return meta


def _unreadable_meta(job: Job, why: str) -> AscendError:
    return AscendError(
        f"job {job.job_id}: its {job.paths.meta} cannot be read as an ascend job's "
        f"description: {why}. It was not written by this version of ascend, or was changed "
        "since. Fix: attach with the ascend version that submitted it; or submit the call "
        "again."
    )


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
        _bridge.register_loop_thread()
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._ready.set()
        await self._stopping.wait()
        # Backends with connections (watches, HTTP clients) close them before the loop ends.
        with anyio.move_on_after(2):
            for backend in list(self._backends.values()):
                aclose = getattr(backend, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception:
                        log.exception("closing a backend failed", backend=backend.name)
        # Storage connections too, while their loop still runs (see Storage.aclose).
        with anyio.move_on_after(2):
            for storage in list(self._storages.values()):
                await storage.aclose()

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
        """A future for a call submitted earlier, perhaps by another process; reads its
        meta.json first (blocking), so an unknown id raises here."""
        job = self._attached_job(job_id, settings, is_map=False, units=(WorkUnit(0, range(1)),))
        meta = self._read_meta(job, "Future.attach()")
        fut: Future[Any] = Future(job_id, str(meta["function"]))
        run = _JobRun(self, Submission(job, settings.backend, [fut]), attached=meta)
        self._start(run)
        run.settled.wait(_OUTPUT_READ_TIMEOUT)  # its published result, if any, is read
        return fut

    def attach_map(
        self, job_id: str, settings: Settings, *, return_exceptions: bool
    ) -> MapFuture[Any]:
        """A map future for a map submitted earlier; reads its meta.json first (blocking)."""
        probe = self._attached_job(job_id, settings, is_map=True, units=())
        meta = self._read_meta(probe, "MapFuture.attach()")
        units = tuple(WorkUnit(i, range(a, b)) for i, (a, b) in enumerate(meta["units"]))
        name = str(meta["function"])
        futures: list[Future[Any]] = [
            Future(job_id, f"{name}[{i}]") for i in range(int(meta["items"]))
        ]
        job = dataclasses.replace(probe, name=name, units=units)
        mf = MapFuture(job_id, name, futures, return_exceptions=return_exceptions)
        run = _JobRun(self, Submission(job, settings.backend, futures), attached=meta)
        self._start(run)
        run.settled.wait(_OUTPUT_READ_TIMEOUT)  # the published results are read
        return mf

    def _read_meta(self, job: Job, what: str) -> dict[str, Any]:
        assert self._loop is not None
        return _bridge.wait(
            asyncio.run_coroutine_threadsafe(
                read_meta(self.storage(job.settings), job), self._loop
            ),
            _OUTPUT_READ_TIMEOUT,
            what,
            "attach from a worker thread in async code: "
            f"`await asyncio.to_thread(ascend.{what.removesuffix('()')}, job_id)`",
        )

    @staticmethod
    def _attached_job(
        job_id: str, settings: Settings, *, is_map: bool, units: tuple[WorkUnit, ...]
    ) -> Job:
        return Job(
            job_id=checked_job_id(job_id),
            name=job_id,
            resources=Resources(),
            settings=settings,
            paths=JobPaths.of(settings.user_prefix, job_id),
            is_map=is_map,
            units=units,
            signing_key=_serialization.signing_key(),
        )

    def submit(self, submission: Submission) -> None:
        """Start a submitted call or map on the loop; returns at once (any thread)."""
        self._start(_JobRun(self, submission, attached=None))

    def _start(self, run: _JobRun) -> None:
        assert self._loop is not None
        # Known from now, not from when the loop gets to it: an exit right after the
        # call must still find it (to cancel it, or to wait until a detached one exists).
        self._runs.add(run)
        run.start(self._loop)

    @property
    def active_jobs(self) -> int:
        return len(self._runs)

    def shutdown(self, timeout: float = _SHUTDOWN_TIMEOUT) -> None:
        """Cancel running jobs (except detached ones), wait for their cleanup, stop the loop."""
        if self._loop is None or not self._thread.is_alive() or self.pid != os.getpid():
            return
        runs = [r for r in list(self._runs) if not r.job.settings.detach]
        detached = [r for r in list(self._runs) if r.job.settings.detach]
        for run in runs:
            try:
                run.cancel_all()
            except Exception:  # one broken job must not keep the others' processes alive
                log.exception("cancelling at exit failed", job=run.job.job_id)
        deadline = time.monotonic() + timeout
        for run in runs:
            run.stopped.wait(max(deadline - time.monotonic(), 0))
        # A detached call must exist without this process before it may exit.
        for run in detached:
            if run.durable is not None and not run.durable.wait(
                max(deadline - time.monotonic(), 0)
            ):
                log.warning("exiting before a detached call was submitted", job=run.job.job_id)
        _bridge.output.drain(max(deadline - time.monotonic(), 0.5))
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
            _exit_cleanly_on_sigterm()
        return _scheduler


def _exit_cleanly_on_sigterm() -> None:
    """Make ``SIGTERM`` (``timeout``, CI cancellation, ``docker stop``) end the process
    like Ctrl-C does: an exception in the main thread, then the exit hooks, which cancel
    calls that were not submitted with ``detach=True``. Only when nobody handles SIGTERM
    yet (its default action would skip every exit hook), and only from the main thread,
    where Python allows it. The exit status stays 143 (128 + SIGTERM), as the default
    action gives."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _terminated)
    except (ValueError, OSError):  # no signals here (an embedded interpreter)
        return


def _terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    raise SystemExit(128 + signum)
