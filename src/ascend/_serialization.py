"""Pickling calls and unpickling results.

Functions and arguments are pickled with cloudpickle, protocol 5, with large buffers
(NumPy arrays, large ``bytes``) out of band. Modules that are not installed packages —
the user's own helper files — are pickled by value, so code imported from the working
directory works in a pod that has never seen it.

Large values are stored once: every out-of-band buffer of at least ``BLOB_THRESHOLD``
bytes, and every argument whose own pickle is that large, becomes a content-addressed
blob (see :mod:`ascend_runner.protocol`) that the envelope refers to by digest. A 100 MB
array passed to every item of a map is hashed once per map and uploaded once, ever.
"""

from __future__ import annotations

import hashlib
import linecache
import os
import pickle
import re
import secrets
import sys
import sysconfig
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from ascend._config import _config_home
from ascend._errors import (
    IntegrityError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
)
from ascend_runner import protocol

_INSTALLED_ROOTS = tuple(
    {
        str(Path(p).resolve())
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_paths().get(key))
    }
    | {str(Path(sys.prefix).resolve()), str(Path(sys.base_prefix).resolve())}
)
_lock = threading.Lock()
_by_value_seen: set[str] = set()
_modules_checked = 0


def _is_user_module(module: ModuleType) -> bool:
    """True for modules loaded from files outside the interpreter's installation."""
    name = module.__name__
    if name == "__main__" or name.split(".")[0] in ("ascend", "ascend_runner"):
        return False
    spec_file = getattr(module, "__file__", None)
    if not spec_file:
        return False
    try:
        path = str(Path(spec_file).resolve())
    except (OSError, RuntimeError):
        return False
    return not path.startswith(_INSTALLED_ROOTS)


def register_user_modules() -> None:
    """Make cloudpickle pickle every user module by value (cached until imports change)."""
    global _modules_checked
    if len(sys.modules) == _modules_checked:
        return
    with _lock:
        for name, module in list(sys.modules.items()):
            if name in _by_value_seen or not isinstance(module, ModuleType):
                continue
            _by_value_seen.add(name)
            if _is_user_module(module):
                cloudpickle.register_pickle_by_value(module)
        _modules_checked = len(sys.modules)


BLOB_THRESHOLD = 1 << 20
"""Buffers and arguments of at least this many bytes are stored once, as blobs."""

# Values that are never worth pickling on their own to measure them.
_SMALL_TYPES = (type(None), bool, int, float, complex, str, bytes)


class Blobs:
    """The large buffers of one submission (a call or a whole map), by SHA-256 digest.

    A buffer is hashed once per submission however many items share it: digests are
    remembered by the identity of the object that exports the buffer (the array, the
    ``bytes``), which this registry keeps alive so the identity cannot be reused.
    """

    def __init__(self, threshold: int = BLOB_THRESHOLD) -> None:
        self.threshold = threshold
        self.content: dict[str, memoryview] = {}
        self._by_object: dict[tuple[int, int], tuple[Any, str]] = {}
        self._arguments: dict[int, tuple[Any, Any]] = {}

    def digest(self, view: memoryview) -> str:
        key = (id(view.obj), view.nbytes)
        known = self._by_object.get(key)
        if known is not None and known[0] is view.obj:
            return known[1]
        flat = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        digest = hashlib.sha256(flat).hexdigest()
        self._by_object[key] = (view.obj, digest)
        self.content.setdefault(digest, flat)
        return digest

    def argument(self, value: Any, what: str) -> Any:
        """``value``, or a stand-in that carries it as one blob when its pickle is large."""
        large_bytes = type(value) is bytes and len(value) >= protocol.LARGE_BYTES
        if type(value) in _SMALL_TYPES and not large_bytes:
            return value
        # One stand-in per object: the pickle then holds one reference to it however
        # many items share the object, so a pod fetches its blob once.
        known = self._arguments.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        if large_bytes:
            replacement = protocol.lift_large_bytes(value)  # out of band, then a blob
        else:
            pickled, buffers = dumps(value, what)
            replacement = _Nested(pickled, buffers) if len(pickled) >= self.threshold else value
        self._arguments[id(value)] = (value, replacement)
        return replacement

    def arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], what: str
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (
            tuple(self.argument(a, what) for a in args),
            {k: self.argument(v, what) for k, v in kwargs.items()},
        )


class _Nested:
    """An argument pickled on its own, shipped as one out-of-band buffer (a blob)."""

    __slots__ = ("buffers", "pickled")

    def __init__(self, pickled: bytes, buffers: list[memoryview]) -> None:
        self.pickled = pickled
        self.buffers = buffers

    def __reduce_ex__(self, proto: Any) -> tuple[Any, ...]:
        return (
            protocol.loads_nested,
            (pickle.PickleBuffer(self.pickled), *(pickle.PickleBuffer(b) for b in self.buffers)),
        )


def dumps(value: Any, what: str) -> tuple[bytes, list[memoryview]]:
    """Pickle ``value``; returns the stream and the out-of-band buffers."""
    register_user_modules()
    buffers: list[memoryview] = []
    try:
        pickled = cloudpickle.dumps(
            protocol.lift_large_bytes(value),
            protocol=5,
            buffer_callback=lambda b: buffers.append(b.raw()),
        )
    except Exception as exc:
        raise SerializationError(
            f"{what} cannot be pickled: {exc!r}. Fix: pass plain data (numbers, strings, "
            "lists, dicts, arrays) or objects that pickle; open files, locks, sockets and "
            "clients must be created inside the remote function."
        ) from exc
    return pickled, buffers


def encode(
    kind: str, value: Any, what: str, key: bytes, blobs: Blobs | None = None
) -> list[protocol.Buffer]:
    """The envelope's parts; with ``blobs``, large buffers are left out and registered."""
    pickled, buffers = dumps(value, what)
    digests: list[str | None] = []
    if blobs is not None:
        digests = [blobs.digest(b) if b.nbytes >= blobs.threshold else None for b in buffers]
    return protocol.encode(kind, pickled, buffers, key=key, blobs=digests)


def digest(parts: Sequence[protocol.Buffer]) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part)
    return f"sha256:{sha.hexdigest()}"


def decode(data: protocol.Buffer, what: str, key: bytes) -> Any:
    """Check and unpickle an envelope written by the runner."""
    try:
        header, offset = protocol.read_header(data)
        pickled, buffers = protocol.split_body(data, header, offset, key=key)
    except protocol.EnvelopeError as exc:
        raise IntegrityError(
            f"{what} was refused before unpickling: {exc}. It was not written by an ascend "
            "runner holding this user's signing key; delete it or rerun the call."
        ) from exc
    try:
        return cloudpickle.loads(pickled, buffers=buffers)
    except Exception as exc:
        raise SerializationError(
            f"{what} cannot be unpickled here: {exc!r}. Fix: install on this machine the "
            "packages whose objects the function returns."
        ) from exc


_DYNAMIC_FRAME = re.compile(r'^(\s*)File "<dynamic-code:([\w.]+)>", line (\d+), in (.*)$', re.M)


def _with_local_sources(text: str) -> str:
    """Point frames of code shipped by value back at this machine's files and source lines."""

    def replace(match: re.Match[str]) -> str:
        indent, module_name, lineno, function = match.groups()
        path = getattr(sys.modules.get(module_name), "__file__", None)
        if not path:
            return f'{indent}File "<{module_name}>", line {lineno}, in {function}'
        frame = f'{indent}File "{path}", line {lineno}, in {function}'
        source = linecache.getline(path, int(lineno)).strip()
        return f"{frame}\n{indent}  {source}" if source else frame

    return _DYNAMIC_FRAME.sub(replace, text)


def rebuild_exception(info: dict[str, Any], where: str) -> BaseException:
    """The remote exception as its own type where possible, else a RemoteError."""
    text = _with_local_sources(str(info.get("traceback") or ""))
    raw = info.get("exception")
    error: BaseException | None = None
    if raw is not None:
        try:
            candidate = cloudpickle.loads(raw)
        except Exception:
            candidate = None
        if isinstance(candidate, BaseException):
            error = candidate
    if error is None:
        return RemoteError(str(info.get("type")), str(info.get("message")), text)
    error.__cause__ = RemoteTraceback(text)
    error.add_note(f"(raised remotely in {where}; the remote traceback is shown above)")
    return error


_keys: dict[Path, bytes] = {}


def signing_key() -> bytes:
    """This user's key for signing packages and verifying results (created on first use).

    Stored in ``$XDG_CONFIG_HOME/ascend/signing-key`` with mode 0600, or taken from
    ``ASCEND_SIGNING_KEY`` (hex) when set.
    """
    env = os.environ.get(protocol.ENV_SIGNING_KEY)
    if env:
        return bytes.fromhex(env)
    path = _config_home() / "ascend" / "signing-key"
    with _lock:
        if path not in _keys:
            _keys[path] = _load_or_create_key(path)
        return _keys[path]


def _load_or_create_key(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".signing-key.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_bytes(32).hex())
        try:
            os.link(staging, path)  # atomic: a concurrent creator's key wins, never half a key
        except FileExistsError:
            pass
        finally:
            staging.unlink()
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < 16:
        raise IntegrityError(
            f"the signing key in {path} is too short; delete the file to renew it."
        )
    return key
