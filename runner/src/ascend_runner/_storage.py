"""Reading packages and publishing results, on local files or through fsspec.

Local paths (``file://`` URLs and bare paths) are handled with plain file calls so a
local run never pays for importing fsspec; every other URL goes to ``_objectstore``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from ascend_runner.protocol import Buffer


def local_path(url: str) -> str | None:
    """The filesystem path of a local URL, or ``None`` for any other store."""
    if url.startswith("file://"):
        path = url[len("file://") :]
        if "%" in path:  # only percent-encoded paths pay for importing urllib
            from urllib.parse import unquote

            path = unquote(path)
        return path
    if "://" not in url:
        return url
    return None


def read_bytes(url: str, options: dict[str, Any], *, large: bool = False) -> Buffer:
    """The whole object, writable so that unpickled arrays are; ``large`` for blobs."""
    path = local_path(url)
    if path is None:
        from ascend_runner import _objectstore

        return _objectstore.read_bytes(url, options, large=large)
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(data)
        return data


def write(url: str, parts: Sequence[Buffer], options: dict[str, Any]) -> None:
    """Write (or replace) an object."""
    path = local_path(url)
    if path is None:
        from ascend_runner import _objectstore

        _objectstore.write_bytes(url, list(parts), options)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)


def exists(url: str, options: dict[str, Any]) -> bool:
    path = local_path(url)
    if path is None:
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(url, **options)
        return bool(fs.exists(fs_path))
    return os.path.exists(path)


def publish_once(url: str, parts: Sequence[Buffer], options: dict[str, Any], attempt: str) -> bool:
    """Publish ``parts`` at ``url`` unless something is already there.

    Returns ``False`` (and leaves the published object untouched) when another attempt
    got there first. Local files: the attempt writes its own file, then ``os.link``
    creates the final name atomically and fails if it exists; a reader never sees a
    partial result and a second writer never replaces the first.
    """
    path = local_path(url)
    if path is None:
        from ascend_runner import _objectstore

        return _objectstore.publish_once(url, list(parts), options)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    staging = os.path.join(folder, f".{os.path.basename(path)}.{attempt}.{os.getpid()}")
    with open(staging, "wb") as f:
        for part in parts:
            f.write(part)
    try:
        os.link(staging, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
    return True
