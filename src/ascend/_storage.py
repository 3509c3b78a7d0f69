"""Object storage through fsspec's async interface, and where each job keeps its files.

Layout under the configured ``storage`` URL::

    projects/{project}/users/{user}/jobs/{job_id}/
        meta.json          what ran: function, resources, versions, content hashes
        package.pkl        the function (and, for a single call, its arguments)
        result.pkl         a single call's result, published once by the runner
        inputs/{chunk}.pkl a map's inputs, one file per chunk
        results/{i}.pkl    a map item's result, published once
        logs/{attempt}.log a copy of each pod's output (Kubernetes backend)
    projects/{project}/users/{user}/blobs/sha256/{digest}
                           large arguments and buffers, stored once by content
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

from ascend._errors import IntegrityError, NoSuchJob, StorageError, unwrap_group
from ascend._logging import logger
from ascend_runner.protocol import Buffer

_CONCURRENCY = 32
_BLOB_CONCURRENCY = 2  # on stores without the S3 path below, an upload copies the blob
_PART_SIZE = 32 << 20  # S3 multipart: part size, and memory per part in flight
_PARTS_IN_FLIGHT = 4


log = logger

_JOB_ID = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def checked_job_id(job_id: object) -> str:
    """``job_id`` if it can name a job: a DNS-1123 label (lowercase letters, digits and
    ``-``, at most 63 characters), as ascend makes them (``train-1f2e3d4c5b``).

    Raises ``TypeError`` for a non-string and :class:`NoSuchJob` for a string no job can
    have (whitespace, ``/``, ``..``, capitals): such an id is never looked up, so it
    cannot reach outside the user's job folders.
    """
    if not isinstance(job_id, str):
        raise TypeError(f"a job id is a str (fut.job_id), not {type(job_id).__name__}")
    if not _JOB_ID.fullmatch(job_id):
        raise NoSuchJob(
            f"{job_id!r} is not an ascend job id: ids are lowercase letters, digits and '-' "
            "(at most 63), like 'train-1f2e3d4c5b'. Fix: copy the id from fut.job_id or "
            "`ascend jobs list`, without quotes or spaces around it.",
            job_id=job_id,
        )
    return job_id


@dataclass(frozen=True)
class JobPaths:
    """Every storage URL of one job."""

    root: str

    @classmethod
    def of(cls, user_prefix: str, job_id: str) -> JobPaths:
        return cls(f"{user_prefix}/jobs/{job_id}")

    @property
    def meta(self) -> str:
        return f"{self.root}/meta.json"

    @property
    def package(self) -> str:
        return f"{self.root}/package.pkl"

    @property
    def result(self) -> str:
        return f"{self.root}/result.pkl"

    def input(self, chunk: int | str) -> str:
        return f"{self.root}/inputs/{chunk}.pkl"

    @property
    def results(self) -> str:
        return f"{self.root}/results"

    def item_result(self, index: int) -> str:
        return f"{self.results}/{index}.pkl"

    @property
    def logs(self) -> str:
        """Folder of the runner's output copies, one ``{attempt}.log`` per pod."""
        return f"{self.root}/logs"


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


class Storage:
    """Async reads and writes of whole objects under one fsspec URL root.

    The filesystem is created lazily on the event loop that uses it (async fsspec
    filesystems are bound to their loop). Concurrency is capped; errors become
    :class:`~ascend.StorageError` naming the URL, except ``FileNotFoundError``.
    """

    def __init__(self, root: str, options: Mapping[str, Any]) -> None:
        self.root = root.rstrip("/")
        self.protocol = protocol_of(root)
        self._options = dict(options)
        self._fs: AsyncFileSystem | None = None
        self._session: Any = None
        self._limiter = anyio.CapacityLimiter(_CONCURRENCY)
        self._blob_limiter = anyio.CapacityLimiter(_BLOB_CONCURRENCY)
        self._lock = anyio.Lock()
        self._blob_uploads: dict[str, anyio.Event] = {}
        self.stats: Counter[str] = Counter()
        """Requests by kind (``write``, ``read``, ...) and ``bytes_written``."""

    async def _filesystem(self) -> AsyncFileSystem:
        if self._fs is not None:
            return self._fs
        async with self._lock:
            if self._fs is None:
                try:
                    cls = fsspec.get_filesystem_class(self.protocol)
                except (ImportError, ValueError) as exc:
                    raise StorageError(
                        f"storage {self.root!r}: no filesystem for '{self.protocol}://': {exc}. "
                        "Fix: install the extra, e.g. pip install 'ascend-k8s[s3]' (s3), "
                        "[gcs] (gs) or [azure] (az)."
                    ) from exc
                if getattr(cls, "async_impl", False):
                    # Not from fsspec's instance cache: an async filesystem belongs to the
                    # loop that made it, and another Storage may live on another loop.
                    fs = cls(asynchronous=True, skip_instance_cache=True, **self._options)
                    if hasattr(fs, "set_session"):  # s3fs: its client, closed by aclose()
                        self._session = await fs.set_session()
                else:
                    fs = AsyncFileSystemWrapper(cls(**self._options), asynchronous=True)
                self._fs = fs
        assert self._fs is not None
        return self._fs

    def _path(self, fs: AsyncFileSystem, url: str) -> str:
        return str(fs._strip_protocol(url))

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the filesystem's connections on this loop, the one that opened them.

        Cloud filesystems register exit-time finalizers that close their sessions on
        their loop; by the interpreter's exit the loop has ended, and some (adlfs) then
        print a traceback, others leave unclosed sessions. This runs those finalizers
        now, while the loop runs, and disarms them. The storage can be used again after
        (a new filesystem is made). Never raises.
        """
        fs, self._fs = self._fs, None
        session, self._session = self._session, None
        if fs is None:
            return
        if session is not None and hasattr(session, "close"):  # s3fs registers no finalizer
            try:
                await session.close()
            except Exception as exc:
                log.debug("closing a storage session failed", error=repr(exc))
        before = asyncio.all_tasks()
        registry: dict[Any, Any] = getattr(weakref.finalize, "_registry", {})
        for finalizer, info in list(registry.items()):
            if info.weakref() is not fs:
                continue
            detached = finalizer.detach()
            if detached is None:
                continue
            _obj, func, args, kwargs = detached
            try:
                if func is fsspec.asyn.sync:  # sync(loop, coroutine function, *args)
                    await args[1](*args[2:], **kwargs)
                else:  # s3fs, gcsfs: schedule the close on the running loop
                    func(*args, **kwargs)
            except Exception as exc:
                log.debug("closing a storage filesystem failed", error=repr(exc))
        started = asyncio.all_tasks() - before
        if started:
            await asyncio.wait(started, timeout=2)

    async def write(self, url: str, parts: Sequence[Buffer]) -> None:
        """Write an object from parts, without joining them first on local files."""
        fs = await self._filesystem()
        path = self._path(fs, url)
        async with self._limiter:
            self.stats["write"] += 1
            self.stats["bytes_written"] += sum(memoryview(p).nbytes for p in parts)
            try:
                if isinstance(fs, AsyncFileSystemWrapper):
                    await anyio.to_thread.run_sync(_write_parts, fs.sync_fs, path, parts)
                else:
                    await fs._pipe_file(path, _joined(parts))
            except Exception as exc:
                raise StorageError(f"cannot write {url}: {exc!r}") from exc

    async def put_blob(self, url: str, data: memoryview, sha256: str) -> bool:
        """Store a content-addressed object unless it is already there.

        ``sha256`` is the hex digest the object is stored under: the bytes are checked
        against it (length and digest) before they are written, so nothing is ever
        stored under a digest it does not have (:class:`~ascend.IntegrityError`
        otherwise). Returns whether it was uploaded. Concurrent jobs sharing a blob
        upload it once; otherwise one existence check per submission decides (so a blob
        removed from the store is uploaded again by the next job that needs it). Readers
        never see a partial blob: object stores publish a PUT (or a multipart upload,
        aborted on failure) whole, and local files are written aside and renamed.
        """
        while url in self._blob_uploads:
            await self._blob_uploads[url].wait()
        done = self._blob_uploads[url] = anyio.Event()
        try:
            if await self.exists(url):
                return False
            async with self._blob_limiter:
                actual = await anyio.to_thread.run_sync(_sha256, data)
                if actual != sha256:
                    raise IntegrityError(
                        f"refusing to store {data.nbytes} bytes at {url}: their SHA-256 is "
                        f"{actual}, not {sha256}. The bytes changed after they were hashed; "
                        "this is a bug in ascend, please report it."
                    )
                await self._write_whole(url, data)
            return True
        finally:
            del self._blob_uploads[url]
            done.set()

    async def _write_whole(self, url: str, data: memoryview) -> None:
        fs = await self._filesystem()
        if hasattr(fs, "_call_s3") and data.nbytes > 2 * _PART_SIZE:
            await self._s3_multipart(fs, url, data)
            return
        await self.write(url, [data])  # a local file is written aside and renamed

    async def _s3_multipart(self, fs: Any, url: str, data: memoryview) -> None:
        """Upload a large buffer in parts, copying only the parts in flight (botocore
        takes bytes, not views); a failed upload is aborted, so nothing partial stays."""
        bucket, key, _ = fs.split_path(self._path(fs, url))
        where = {"Bucket": bucket, "Key": key}
        self.stats["write"] += 1
        self.stats["bytes_written"] += data.nbytes
        try:
            upload = (await fs._call_s3("create_multipart_upload", **where))["UploadId"]
        except Exception as exc:
            raise StorageError(f"cannot write {url}: {exc!r}") from exc
        starts = range(0, data.nbytes, _PART_SIZE)
        etags: dict[int, str] = {}
        limiter = anyio.CapacityLimiter(_PARTS_IN_FLIGHT)

        async def put(number: int, start: int) -> None:
            async with limiter:
                body = bytes(data[start : start + _PART_SIZE])
                out = await fs._call_s3(
                    "upload_part", **where, UploadId=upload, PartNumber=number, Body=body
                )
                etags[number] = out["ETag"]

        try:
            async with anyio.create_task_group() as tg:
                for number, start in enumerate(starts, 1):
                    tg.start_soon(put, number, start)
            parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
            await fs._call_s3(
                "complete_multipart_upload",
                **where,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                try:
                    await fs._call_s3("abort_multipart_upload", **where, UploadId=upload)
                except Exception as abort_error:
                    exc.add_note(f"aborting the multipart upload failed: {abort_error!r}")
            if isinstance(exc, Exception):
                raise StorageError(f"cannot write {url}: {unwrap_group(exc)!r}") from exc
            raise
        fs.invalidate_cache(self._path(fs, url))

    async def write_json(self, url: str, value: Any) -> None:
        await self.write(url, [json.dumps(value, indent=2, sort_keys=True).encode()])

    async def read(self, url: str) -> Buffer:
        """The whole object. Raises ``FileNotFoundError`` if it does not exist."""
        fs = await self._filesystem()
        path = self._path(fs, url)
        async with self._limiter:
            self.stats["read"] += 1
            try:
                if isinstance(fs, AsyncFileSystemWrapper):
                    return await anyio.to_thread.run_sync(_read_all, fs.sync_fs, path)
                # One GET: without a range, s3fs would first ask for the size.
                data: bytes = await fs._cat_file(path, start=0)
                return data
            except FileNotFoundError:
                raise
            except Exception as exc:
                raise StorageError(f"cannot read {url}: {exc!r}") from exc

    async def read_head(self, url: str, size: int) -> bytes:
        """The object's first ``size`` bytes (all of it when shorter), in one ranged
        read. Raises ``FileNotFoundError`` if it does not exist."""
        fs = await self._filesystem()
        path = self._path(fs, url)
        async with self._limiter:
            self.stats["read"] += 1
            try:
                data = await fs._cat_file(path, start=0, end=size)
            except FileNotFoundError:
                raise
            except Exception as exc:
                raise StorageError(f"cannot read {url}: {exc!r}") from exc
        return bytes(data)

    async def read_json(self, url: str) -> Any:
        return json.loads(bytes(await self.read(url)))

    async def exists(self, url: str) -> bool:
        fs = await self._filesystem()
        async with self._limiter:
            self.stats["exists"] += 1
            try:
                return bool(await fs._exists(self._path(fs, url)))
            except Exception as exc:
                raise StorageError(f"cannot check {url}: {exc!r}") from exc

    async def list(self, url: str) -> list[str]:
        """Names (not paths) directly under ``url``; empty if it does not exist."""
        fs = await self._filesystem()
        path = self._path(fs, url)
        async with self._limiter:
            self.stats["list"] += 1
            try:
                entries = await fs._ls(path, detail=False)
            except FileNotFoundError:
                return []
            except Exception as exc:
                raise StorageError(f"cannot list {url}: {exc!r}") from exc
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    async def delete(self, url: str, *, recursive: bool = False) -> None:
        fs = await self._filesystem()
        async with self._limiter:
            self.stats["delete"] += 1
            try:
                await fs._rm(self._path(fs, url), recursive=recursive)
            except FileNotFoundError:
                pass
            except Exception as exc:
                raise StorageError(f"cannot delete {url}: {exc!r}") from exc


def _sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _joined(parts: Sequence[Buffer]) -> Buffer:
    """One buffer for stores that take one; a lone ``bytes`` part is not copied."""
    if len(parts) == 1:
        only = parts[0]
        if isinstance(only, bytes):
            return only
        if (
            isinstance(only, memoryview)
            and isinstance(only.obj, bytes)
            and only.nbytes == len(only.obj)
        ):
            return only.obj
    return b"".join(parts)


def _write_parts(fs: Any, path: str, parts: Sequence[Buffer]) -> None:
    """Write aside, then rename into place: a reader sees the whole object or none, as
    with an object store's PUT (a ``meta.json`` read while it is written is never empty)."""
    fs.makedirs(fs._parent(path), exist_ok=True)
    staging = f"{path}.{secrets.token_hex(6)}.partial"
    try:
        with fs.open(staging, "wb") as f:
            for part in parts:
                f.write(part)
        fs.mv(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.rm(staging)
        raise


def _read_all(fs: Any, path: str) -> Buffer:
    with fs.open(path, "rb") as f:
        size = fs.size(path)
        if size is None:
            return bytes(f.read())
        data = bytearray(size)
        view = memoryview(data)
        filled = 0
        while filled < size:
            n = f.readinto(view[filled:])
            if not n:
                break
            filled += n
        return data if filled == size else data[:filled]
