"""The storage contract on local files and fsspec's in-memory store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from tests.integration.storage_contract import StorageContract


class TestLocalFiles(StorageContract):
    @pytest.fixture
    def root(self, tmp_path: Path) -> tuple[str, dict]:
        return tmp_path.as_uri(), {}


class TestMemory(StorageContract):
    @pytest.fixture
    def root(self) -> Iterator[tuple[str, dict]]:
        url = f"memory://contract-{uuid.uuid4().hex}"
        yield url, {}
        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)
