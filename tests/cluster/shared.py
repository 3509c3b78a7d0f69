"""A folder both the test process and every pod can use: gates, markers, counters.

A pod is a container that sees no host folder, so the folder lives in the storage the
pods already reach (the cluster's S3 store; credentials come from the pod's environment);
a ``file://`` URL serves kind and local runs. The object is pickled into the call with
its URL and options.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Shared:
    url: str  # an fsspec folder URL: file:///..., s3://bucket/prefix
    options: dict[str, Any] = field(default_factory=dict)

    def _fs(self) -> Any:
        import fsspec

        protocol = self.url.split("://")[0]
        return fsspec.filesystem(protocol, skip_instance_cache=True, **self.options)

    def path(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _key(self, name: str) -> str:
        return self.path(name).split("://", 1)[1]

    def touch(self, name: str, text: str = "") -> None:
        fs = self._fs()
        if self.url.startswith("file://"):
            fs.makedirs(self.url.split("://", 1)[1], exist_ok=True)
        fs.pipe_file(self._key(name), text.encode())

    def exists(self, name: str) -> bool:
        return bool(self._fs().exists(self._key(name)))

    def read_text(self, name: str) -> str:
        return str(self._fs().cat_file(self._key(name)).decode())

    def append(self, name: str, text: str) -> None:
        """Read, extend, write (one writer per name at a time: not atomic)."""
        current = self.read_text(name) if self.exists(name) else ""
        self.touch(name, current + text)

    def wait(self, name: str, interval: float = 0.1) -> None:
        """Block until ``name`` exists (in a pod: a gate the test opens)."""
        while not self.exists(name):
            time.sleep(interval)
