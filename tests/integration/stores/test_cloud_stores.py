"""The real emulators: fsspec round trips, the storage contract, create-only publishing,
and calls whose packages and results live in each cloud store."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import anyio
import pytest

import ascend
from ascend import _storage
from ascend_runner import _objectstore
from tests.cluster.stores import Registry, Store
from tests.integration.storage_contract import StorageContract

pytestmark = pytest.mark.stores


def test_round_trip_with_only_env_and_options(cloud_store: Store, store_prefix: str) -> None:
    fs = cloud_store.filesystem()
    path = f"{store_prefix}/a/b.bin"
    fs.pipe(path, b"payload")
    assert fs.cat(path) == b"payload"
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{store_prefix}/a")] == ["b.bin"]
    fs.rm(path)
    assert not fs.exists(path)


def test_publish_once_keeps_the_first_writer(cloud_store: Store, store_prefix: str) -> None:
    url, options = f"{store_prefix}/result.pkl", cloud_store.storage_options
    assert _objectstore.publish_once(url, [b"first"], options) is True
    assert _objectstore.publish_once(url, [b"second"], options) is False
    assert _objectstore.read_bytes(url, options) == b"first"


def test_racing_publishers_publish_exactly_once(cloud_store: Store, store_prefix: str) -> None:
    url, options = f"{store_prefix}/race.pkl", cloud_store.storage_options
    results: list[bool] = []
    barrier = threading.Barrier(6)

    def publish(i: int) -> None:
        barrier.wait()
        results.append(_objectstore.publish_once(url, [f"writer {i}".encode()], options))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert _objectstore.read_bytes(url, options).startswith(b"writer ")


def test_missing_object_is_file_not_found(cloud_store: Store, store_prefix: str) -> None:
    with pytest.raises(FileNotFoundError):
        _objectstore.read_bytes(f"{store_prefix}/missing", cloud_store.storage_options)


def test_a_call_runs_with_its_package_and_result_in_the_store(
    cloud_store: Store, store_prefix: str
) -> None:
    settings = ascend.configure(storage=store_prefix, storage_options=cloud_store.storage_options)

    @ascend.remote
    def double(x: int) -> int:
        return 2 * x

    call = double(7)
    assert call.result(timeout=120) == 14
    mapped = double.map([1, 2], chunksize=1)
    assert mapped.result(timeout=120) == [2, 4]
    options = cloud_store.storage_options
    call_paths = _storage.JobPaths.of(settings.user_prefix, call.job_id)
    map_paths = _storage.JobPaths.of(settings.user_prefix, mapped.job_id)
    for url in (
        call_paths.package,
        call_paths.result,
        map_paths.package,
        map_paths.item_result(0),
        map_paths.item_result(1),
    ):
        assert url.startswith(store_prefix)
        assert _objectstore.read_bytes(url, options), f"{url} is not in the store"


def test_small_objects_are_read_with_one_request_each(s3_store: Store) -> None:
    # s3fs asks for an object's size (HEAD) before a whole-object read unless given a
    # range; the client and the runner read small objects with one GET.
    s3_store.activate()
    root = f"{s3_store.url}/one-get-{uuid.uuid4().hex}"
    url = f"{root}/result.pkl"

    async def write_and_read() -> bytes:
        storage = _storage.Storage(root, s3_store.storage_options)
        await storage.write(url, [b"payload"])
        before.append(log.stat().st_size)
        return bytes(await storage.read(url))

    log, before = s3_store.process.log_path, []
    assert anyio.run(write_and_read) == b"payload"
    assert _objectstore.read_bytes(url, s3_store.storage_options) == b"payload"
    time.sleep(0.5)  # the server writes its request log after answering
    with log.open("rb") as f:
        f.seek(before[0])
        text = f.read().decode()
    # Request lines, perhaps coloured: "GET /bucket/.../result.pkl HTTP/1.1"
    assert re.findall(r'"(?:\x1b\[[\d;]*m)*([A-Z]+) \S*/result\.pkl ', text) == ["GET", "GET"]


@pytest.mark.anyio
async def test_a_failed_multipart_blob_upload_is_aborted(
    s3_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_store.activate()
    monkeypatch.setattr(_storage, "_PART_SIZE", 5 << 20)
    storage = _storage.Storage(f"{s3_store.url}/abort-{uuid.uuid4().hex}", s3_store.storage_options)
    fs = await storage._filesystem()
    call_s3 = fs._call_s3

    async def failing(method: str, *args: object, **kwargs: object) -> object:
        if method == "upload_part" and kwargs.get("PartNumber") == 2:
            raise ConnectionError("network down")
        return await call_s3(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", failing)
    url = f"{storage.root}/blobs/sha256/large"
    with pytest.raises(ascend.StorageError, match="network down"):
        data = memoryview(bytes(12 << 20))
        await storage.put_blob(url, data, hashlib.sha256(data).hexdigest())
    bucket, key, _ = fs.split_path(fs._strip_protocol(url))
    pending = await call_s3("list_multipart_uploads", Bucket=bucket)
    assert not [u for u in pending.get("Uploads", []) if u["Key"] == key], "left an upload open"
    assert not await storage.exists(url)


class TestCloudStorageContract(StorageContract):
    @pytest.fixture
    def root(self, cloud_store: Store) -> tuple[str, dict]:
        return f"{cloud_store.url}/contract-{uuid.uuid4().hex}", dict(cloud_store.storage_options)


def test_registry_serves_the_v2_api_and_stores_a_blob(oci_registry: Registry) -> None:
    import hashlib

    with urllib.request.urlopen(f"http://{oci_registry.url}/v2/", timeout=10) as response:
        assert response.status == 200
    blob = b"ascend test layer"
    digest = f"sha256:{hashlib.sha256(blob).hexdigest()}"
    start = urllib.request.Request(
        f"http://{oci_registry.url}/v2/ascend/test/blobs/uploads/", method="POST"
    )
    with urllib.request.urlopen(start, timeout=10) as response:
        location = response.headers["Location"]
    separator = "&" if "?" in location else "?"
    put = urllib.request.Request(
        f"{location}{separator}digest={digest}",
        data=blob,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(put, timeout=10) as response:
        assert response.status == 201
    with urllib.request.urlopen(
        f"http://{oci_registry.url}/v2/ascend/test/blobs/{digest}", timeout=10
    ) as response:
        assert response.read() == blob


def test_arrays_come_back_writable_through_the_store(cloud_store: Store, store_prefix: str) -> None:
    # Object stores hand back immutable bytes; unpickled arrays must still be writable.
    ascend.configure(storage=store_prefix, storage_options=cloud_store.storage_options)

    @ascend.remote
    def arrays(n: int) -> dict[str, object]:
        import numpy as np

        base = np.arange(n, dtype=np.float64)
        return {
            "small": base[:10].copy(),
            "large": base,
            "fortran": np.asfortranarray(base.reshape(-1, 512)),
            "strided": base[::3],
        }

    for name, array in arrays(1 << 18).result(timeout=120).items():
        assert array.flags.writeable, name
        array[...] = 0


def test_an_argument_changed_after_the_call_is_stored_as_it_was(
    cloud_store: Store, store_prefix: str
) -> None:
    import numpy as np

    ascend.configure(storage=store_prefix, storage_options=cloud_store.storage_options)

    @ascend.remote
    def total(a: object) -> float:
        return float(a.sum())  # type: ignore[attr-defined]

    array = np.ones(1 << 19)  # 4 MiB: a blob
    fut = total(array)
    array[...] = 0
    assert fut.result(timeout=120) == float(1 << 19)
    fs = cloud_store.filesystem()
    paths = fs.find(f"{ascend._config.current().blobs}/sha256")
    assert paths, "a 4 MiB argument is stored as a blob"
    for path in paths:
        assert hashlib.sha256(fs.cat(path)).hexdigest() == path.rsplit("/", 1)[-1]


def test_a_script_using_the_store_exits_without_warnings_or_tracebacks(
    cloud_store: Store, store_prefix: str, tmp_path: Path
) -> None:
    """The store's connections are closed on the loop that opened them, before it ends:
    nothing is left for the interpreter's exit to complain about."""
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(f"""
        import ascend
        ascend.configure(storage={store_prefix!r},
                         storage_options={cloud_store.storage_options!r})

        @ascend.remote
        def double(x):
            return 2 * x

        print(double(21).result(timeout=120))
        """)
    )
    env = {**os.environ, **cloud_store.env}
    done = subprocess.run(
        [sys.executable, "-W", "always", str(script)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr, done.stderr
