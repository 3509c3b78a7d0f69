"""Object stores through fsspec's synchronous API (imported only for non-local URLs).

``publish_once`` is a real create-only write on each store — S3 ``If-None-Match: *``
(s3fs), GCS ``ifGenerationMatch=0`` (gcsfs), Azure ``overwrite=False`` (adlfs),
fsspec's in-memory store ``"xb"`` — so a second writer can never replace a result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ascend_runner.protocol import Buffer


def _filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url, **options)  # type: ignore[no-any-return]


def _join(data: Buffer | Sequence[Buffer]) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    return b"".join(data)


def read_bytes(url: str, options: dict[str, Any], *, large: bool = False) -> bytearray:
    """The whole object, writable (so arrays unpickled from it are writable, as locally).

    Asked for without a range, s3fs first looks up the object's size (one more request)
    to download a large one in concurrent parts: worth it for ``large`` objects (blobs)
    only. Otherwise one GET with the open range ``bytes=0-`` reads it.
    """
    fs, path = _filesystem(url, options)
    return bytearray(fs.cat_file(path) if large else fs.cat_file(path, start=0))


def write_bytes(url: str, data: Buffer | Sequence[Buffer], options: dict[str, Any]) -> None:
    fs, path = _filesystem(url, options)
    fs.pipe_file(path, _join(data))


def _already_exists(exc: BaseException) -> bool:
    """True for the ways stores say "a create-only write found the object there"."""
    if isinstance(exc, FileExistsError):
        return True
    text = f"{type(exc).__name__} {exc}"
    markers = (
        "PreconditionFailed",
        "412",
        "Precondition Failed",
        "conditionNotMet",
        "BlobAlreadyExists",
    )
    return any(marker in text for marker in markers)


def publish_once(url: str, data: Buffer | Sequence[Buffer], options: dict[str, Any]) -> bool:
    """Create ``url`` with ``data`` unless it exists; True when this call created it."""
    fs, path = _filesystem(url, options)
    try:
        fs.pipe_file(path, _join(data), mode="create")
    except Exception as exc:
        if _already_exists(exc):
            return False
        raise
    return True
