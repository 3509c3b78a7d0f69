"""The storage contract every store must pass; a test module binds ``root`` to a store.

Used by ``test_storage_contract.py`` (local files, memory) and by the cloud-store tests.
"""

from __future__ import annotations

import hashlib

import anyio
import pytest

from ascend import IntegrityError, StorageError, _storage
from ascend._storage import Storage


@pytest.mark.anyio
class StorageContract:
    """Subclass and provide a ``root`` fixture yielding ``(url, storage_options)``."""

    @pytest.fixture
    def storage(self, root: tuple[str, dict]) -> Storage:
        url, options = root
        return Storage(url, options)

    async def test_write_read_round_trip_of_parts(self, storage: Storage) -> None:
        url = f"{storage.root}/a/b/object.bin"
        await storage.write(url, [b"head:", memoryview(b"body" * 1000), bytearray(b":tail")])
        assert bytes(await storage.read(url)) == b"head:" + b"body" * 1000 + b":tail"

    async def test_write_replaces_and_json_round_trips(self, storage: Storage) -> None:
        url = f"{storage.root}/meta.json"
        await storage.write_json(url, {"n": 1})
        await storage.write_json(url, {"n": 2, "list": [1, "x"]})
        assert await storage.read_json(url) == {"n": 2, "list": [1, "x"]}

    async def test_missing_object_raises_file_not_found(self, storage: Storage) -> None:
        with pytest.raises(FileNotFoundError):
            await storage.read(f"{storage.root}/does/not/exist")
        assert not await storage.exists(f"{storage.root}/does/not/exist")

    async def test_list_names_and_recursive_delete(self, storage: Storage) -> None:
        folder = f"{storage.root}/jobs/j1"
        for name in ("package.pkl", "meta.json"):
            await storage.write(f"{folder}/{name}", [name.encode()])
        assert await storage.list(folder) == ["meta.json", "package.pkl"]
        assert await storage.exists(f"{folder}/meta.json")
        await storage.delete(folder, recursive=True)
        assert await storage.list(folder) == []
        assert not await storage.exists(f"{folder}/meta.json")
        await storage.delete(folder, recursive=True)  # deleting nothing is fine

    async def test_many_concurrent_writes_and_reads(self, storage: Storage) -> None:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(storage.write, f"{storage.root}/many/{i}", [str(i).encode()])
        values = [bytes(await storage.read(f"{storage.root}/many/{i}")) for i in range(50)]
        assert values == [str(i).encode() for i in range(50)]

    async def test_a_large_blob_is_stored_whole_and_only_once(
        self, storage: Storage, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(_storage, "_PART_SIZE", 5 << 20)  # S3: a three-part upload
        data = memoryview(bytes(range(256)) * (48 << 12))  # 12 MiB
        digest = hashlib.sha256(data).hexdigest()
        url = f"{storage.root}/blobs/sha256/{digest}"
        assert await storage.put_blob(url, data, digest) is True
        assert bytes(await storage.read(url)) == data
        assert await storage.put_blob(url, data, digest) is False
        assert await storage.list(f"{storage.root}/blobs/sha256") == [digest]

    async def test_bytes_are_never_stored_under_a_digest_they_do_not_have(
        self, storage: Storage
    ) -> None:
        data = memoryview(b"the bytes that were hashed")
        other = hashlib.sha256(b"other bytes").hexdigest()
        url = f"{storage.root}/blobs/sha256/{other}"
        with pytest.raises(IntegrityError, match="refusing to store 26 bytes"):
            await storage.put_blob(url, data, other)
        assert not await storage.exists(url)

    async def test_unknown_protocol_is_a_storage_error_naming_the_fix(self) -> None:
        with pytest.raises(StorageError, match="no filesystem for 'nosuchproto://'"):
            await Storage("nosuchproto://bucket", {}).read("nosuchproto://bucket/x")
