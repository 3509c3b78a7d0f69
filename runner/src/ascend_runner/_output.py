"""Keeping a copy of everything the runner's process writes, for storage.

Pod logs disappear with the pod; a copy in the job's folder outlives it. The copy is
taken at the file-descriptor level (stdout and stderr, merged, as a container runtime
sees them), so output from C extensions and child processes is kept too.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from typing import Any


class OutputCopy:
    """Duplicates fds 1 and 2 into a temporary file while still writing them through."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by finish()
        self._saved = os.dup(1)
        read_end, self._write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._write_end, 1)
        os.dup2(self._write_end, 2)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True)
        self._thread.start()

    def _pump(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                os.write(self._saved, chunk)
                self._file.write(chunk)

    def finish(self) -> bytes:
        """Restore the original descriptors and return everything written."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved, 1)
        os.dup2(self._saved, 2)
        os.close(self._write_end)
        self._thread.join(timeout=10)
        self._file.seek(0)
        data: bytes = self._file.read()
        self._file.close()
        return data


def upload(url: str, data: bytes, options: dict[str, Any]) -> None:
    from ascend_runner import _storage

    _storage.write(url, [data], options)
