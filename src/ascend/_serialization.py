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
import io
import linecache
import os
import pickle
import pickletools
import re
import secrets
import sys
import sysconfig
import threading
from collections.abc import Sequence
from pathlib import Path
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
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
    """The buffers of one submission (a call or a whole map), copied and hashed once.

    Every out-of-band buffer is copied when the call is made (a snapshot), so an array
    the caller changes right after the call cannot change what the call sees, nor the
    bytes that its signature and digests cover. The copy and the SHA-256 digest are
    remembered by the identity of the object that exports the buffer (the array, the
    ``bytes``), which this registry keeps alive so the identity cannot be reused: an
    array shared by every item of a map is copied and hashed once.
    """

    def __init__(self, threshold: int = BLOB_THRESHOLD) -> None:
        self.threshold = threshold
        self.content: dict[str, memoryview] = {}
        self._snapshots: dict[tuple[int, int], tuple[Any, memoryview]] = {}
        self._digests: dict[int, tuple[Any, str]] = {}
        self._arguments: dict[int, tuple[Any, Any]] = {}
        self._inside: dict[int, tuple[Any, frozenset[int], dict[int, Any]]] = {}

    def snapshot(self, view: memoryview) -> memoryview:
        """A copy of the buffer's bytes as they are now (``bytes`` are not copied)."""
        key = (id(view.obj), view.nbytes)
        known = self._snapshots.get(key)
        if known is not None and known[0] is view.obj:
            return known[1]
        copy = snapshot(view)
        self._snapshots[key] = (view.obj, copy)
        return copy

    def digest(self, view: memoryview) -> str:
        """Register a snapshot (from :meth:`snapshot`) as a blob; returns its digest."""
        known = self._digests.get(id(view.obj))
        if known is not None and known[0] is view.obj:
            return known[1]
        digest = hashlib.sha256(view).hexdigest()
        self._digests[id(view.obj)] = (view.obj, digest)
        self.content.setdefault(digest, view)
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
            pickled, buffers = dumps(value, what, self)
            replacement = _Nested(pickled, buffers) if len(pickled) >= self.threshold else value
        self._arguments[id(value)] = (value, replacement)
        return replacement

    def arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], what: str
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The stand-ins of one call's arguments.

        An argument pickled on its own (a blob) must not share an object with another
        argument of the same call: both would arrive with their own copy, where plain
        pickling gives one object. Such an argument travels inside the call's pickle.
        """
        values = [*args, *kwargs.values()]
        out = [self.argument(v, what) for v in values]
        distinct = {id(v): v for v in values if type(v) not in _SMALL_TYPES}
        if len(distinct) > 1 and any(isinstance(r, _Nested) for r in out):
            inside = {key: self._contents(v, what) for key, v in distinct.items()}
            for i, (value, replacement) in enumerate(zip(values, out, strict=True)):
                if isinstance(replacement, _Nested) and any(
                    not inside[id(value)].isdisjoint(theirs)
                    for key, theirs in inside.items()
                    if key != id(value)
                ):
                    out[i] = value
        return tuple(out[: len(args)]), dict(zip(kwargs, out[len(args) :], strict=True))

    def _contents(self, value: Any, what: str) -> frozenset[int]:
        """The ids of the objects in ``value`` whose identity matters (once per object)."""
        known = self._inside.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        probe = _Probe()
        try:
            probe.dump(protocol.lift_large_bytes(value))
        except Exception as exc:
            raise SerializationError(f"{what} cannot be pickled: {exc!r}") from exc
        ids = frozenset(probe.seen)
        self._inside[id(value)] = (value, ids, probe.seen)  # keeps those ids theirs
        return ids


class _Probe(cloudpickle.Pickler):  # type: ignore[misc]
    """Pickles a value into nothing, collecting the objects whose identity matters."""

    def __init__(self) -> None:
        super().__init__(_Discard(), protocol=5, buffer_callback=lambda b: None)
        self.seen: dict[int, Any] = {}

    def persistent_id(self, obj: Any) -> None:
        # Called for every object pickle meets; the cheapest test comes first.
        if type(obj) not in _IMMUTABLE and _identity_matters(obj):
            self.seen[id(obj)] = obj


class _Discard:
    def write(self, data: Any) -> int:
        return len(data)


def _identity_matters(obj: Any) -> bool:
    """Whether unpickling two copies of ``obj`` instead of one could be noticed: true
    for mutable values and instances, false for strings, numbers, tuples and things
    pickled by name (classes, functions, modules)."""
    if type(obj) in _IMMUTABLE or isinstance(obj, _BY_NAME):
        return False
    # Read from the type only: an instance's own __getattr__ must not run here.
    kind = type(obj)
    return kind.__hash__ is None or kind.__dictoffset__ != 0 or hasattr(kind, "__slots__")


_IMMUTABLE = (*_SMALL_TYPES, tuple, frozenset)
_BY_NAME = (type, FunctionType, BuiltinFunctionType, MethodType, ModuleType)


def snapshot(view: memoryview) -> memoryview:
    """The buffer's bytes as they are now, in memory nobody else can change.

    A ``bytes`` object is immutable and is kept as it is; anything else (an array, a
    ``bytearray``, a buffer shared with other code) is copied.
    """
    flat = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    root: Any = flat.obj
    while isinstance(root, memoryview):
        root = root.obj
    if type(root) is bytes:
        return flat
    copy = getattr(root, "copy", None)
    if type(root).__module__ == "numpy" and callable(copy) and root.nbytes == flat.nbytes:
        # NumPy allocates large copies faster than bytes() (huge pages), and copying
        # in the array's own order keeps its raw bytes in the same order.
        return pickle.PickleBuffer(copy(order="K")).raw()
    return memoryview(flat.tobytes())


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


def dumps(value: Any, what: str, blobs: Blobs | None = None) -> tuple[bytes, list[memoryview]]:
    """Pickle ``value``; returns the stream and snapshots of the out-of-band buffers."""
    register_user_modules()
    buffers: list[memoryview] = []
    copy = snapshot if blobs is None else blobs.snapshot
    try:
        pickled = cloudpickle.dumps(
            protocol.lift_large_bytes(value),
            protocol=5,
            buffer_callback=lambda b: buffers.append(copy(b.raw())),
        )
    except Exception as exc:
        if not _too_deep(exc):
            raise SerializationError(
                f"{what} cannot be pickled: {exc!r}. Fix: pass plain data (numbers, strings, "
                "lists, dicts, arrays) or objects that pickle; open files, locks, sockets and "
                "clients must be created inside the remote function."
            ) from exc
        raise SerializationError(
            f"{what} cannot be pickled: it nests too deeply ({exc}). Fix: pass a flatter "
            "structure (a linked list or tree thousands of levels deep exceeds Python's "
            "recursion limit), or raise it with sys.setrecursionlimit()."
        ) from exc
    return pickled, buffers


def _too_deep(exc: BaseException) -> bool:
    """Pickling ran out of recursion depth (cloudpickle reports it as a PicklingError)."""
    return isinstance(exc, RecursionError) or "recursion" in str(exc)


def encode(
    kind: str, value: Any, what: str, key: bytes, blobs: Blobs | None = None
) -> list[protocol.Buffer]:
    """The envelope's parts; with ``blobs``, large buffers are left out and registered.

    Every part is a snapshot taken now: changing an argument after this returns changes
    neither the envelope nor its signature.
    """
    pickled, buffers = dumps(value, what, blobs)
    digests: list[str | None] = []
    if blobs is not None:
        digests = [blobs.digest(b) if b.nbytes >= blobs.threshold else None for b in buffers]
    return protocol.encode(kind, pickled, buffers, key=key, blobs=digests)


def digest(parts: Sequence[protocol.Buffer]) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part)
    return f"sha256:{sha.hexdigest()}"


STATUS_HEAD = 64 << 10
"""Bytes of a published result that :func:`peek_status` needs (its header and the
first opcodes of its pickle); more than any header ascend writes."""

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}


def peek_status(head: protocol.Buffer) -> str | None:
    """``"ok"`` (a value) or ``"error"`` (an exception): what a published result holds,
    read from its first bytes (``STATUS_HEAD`` of them) without unpickling anything.

    The runner publishes ``("ok" | "error", payload)``, so the status is the first
    string of the pickle. The signature is not checked (it covers the whole body): this
    is for listings, never for handing a value to anyone. ``None`` when the bytes do
    not say (not a result envelope, a truncated header, another pickle shape).
    """
    try:
        header, offset = protocol.read_header(head)
    except protocol.EnvelopeError:
        return None
    if header.kind != "result":
        return None
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(bytes(memoryview(head)[offset:]))):
            if opcode.name in _STRING_OPS:
                return arg if arg in ("ok", "error") else None
            if opcode.name not in ("PROTO", "FRAME"):
                return None  # the status is the tuple's first item: nothing else before it
    except ValueError:  # the head ends inside an opcode
        return None
    return None


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
    # Arrays unpickled from read-only memory are read-only; object stores hand back
    # ``bytes``. Values must come back as plain pickling gives them: writable.
    buffers = [memoryview(bytearray(b)) if b.readonly else b for b in buffers]
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
    """The remote exception as its own type where possible, else a :class:`RemoteError`.

    An exception that cannot be rebuilt exactly (its ``__init__`` needs other arguments
    than it keeps, an attribute does not pickle) still matches ``except ItsType:`` when
    its type can be found in a module already imported here: it is raised as an instance
    of a subclass of both that type and :class:`RemoteError`, and says why.
    """
    text = _with_local_sources(str(info.get("traceback") or ""))
    type_name, message = str(info.get("type")), str(info.get("message"))
    if type_name == protocol.SERIALIZATION_ERROR:
        return SerializationError(f"{where}: {message}")
    raw = info.get("exception")
    reason = info.get("rebuild_error") or "the runner did not send it"
    error: BaseException | None = None
    if raw is not None:
        try:
            candidate = cloudpickle.loads(raw)
        except Exception as exc:
            reason = f"unpickling it here failed: {exc!r}"
        else:
            if isinstance(candidate, BaseException):
                error = candidate
            else:
                reason = f"it unpickled as a {type(candidate).__name__}, not an exception"
    if error is None:
        rebuilt = remote_error(type_name, message, text, str(reason))
        _restore_attributes(rebuilt, info.get("attributes") or {})
        return rebuilt
    error.__cause__ = RemoteTraceback(text)
    error.add_note(f"(raised remotely in {where}; the remote traceback is shown above)")
    return error


_OWN_ATTRIBUTES = frozenset({"type_name", "message", "remote_traceback", "reason", "args"})


def _restore_attributes(error: RemoteError, attributes: dict[str, Any]) -> None:
    """Give the stand-in the remote exception's attributes that could travel (``e.code``)."""
    lost: list[str] = []
    for name, raw in attributes.items():
        if name in _OWN_ATTRIBUTES or not isinstance(raw, bytes):
            continue
        try:
            setattr(error, name, cloudpickle.loads(raw))
        except Exception as exc:  # one such attribute must not hide the error itself
            lost.append(f"{name} ({type(exc).__name__})")
    if lost:
        error.add_note(f"(attributes that could not be rebuilt here: {', '.join(lost)})")


def remote_error(type_name: str, message: str, text: str, reason: str = "") -> RemoteError:
    """A :class:`RemoteError` for ``type_name``, also an instance of that type when the
    type is an ``Exception`` subclass in a module imported here."""
    original = _imported_type(type_name)
    cls: type[RemoteError] = RemoteError
    if original is not None and issubclass(original, Exception):
        cls = _remote_error_class(original)
    error = cls(type_name, message, text, reason)
    if reason:
        if original is not None and isinstance(error, original):
            stand_in = (
                f"It is raised as an instance of both {type_name} and ascend.RemoteError, "
                "whose __init__ did not run."
            )
        elif original is None:
            stand_in = f"Fix: import {type_name} in this process to catch it by its own type."
        else:
            stand_in = (
                f"It is raised as ascend.RemoteError: {type_name} cannot be combined with it."
            )
        error.add_note(
            f"(raised remotely as {type_name}, which could not be rebuilt exactly here: "
            f"{reason}. {stand_in})"
        )
    return error


def _imported_type(type_name: str) -> type[BaseException] | None:
    """The exception type named ``module.QualName``, if its module is imported here.

    Modules are never imported for this: a type the caller can name in ``except`` is
    already loaded, and importing a module named by remote data would run its code.
    """
    parts = type_name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:split]))
        if module is None:
            continue
        found: Any = module
        for attribute in parts[split:]:
            found = getattr(found, attribute, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
        return None
    return None


_remote_classes: dict[type[Exception], type[RemoteError]] = {}


def _remote_error_class(original: type[Exception]) -> type[RemoteError]:
    """A subclass of ``original`` and :class:`RemoteError` (one per type), or plain
    ``RemoteError`` when the two cannot be combined (incompatible C layouts)."""
    with _lock:
        cls = _remote_classes.get(original)
        if cls is None:
            if issubclass(original, RemoteError):
                cls = original
            else:
                try:
                    cls = type(
                        original.__name__,
                        (_RebuiltRemoteError, original),
                        {"__module__": original.__module__, "__qualname__": original.__qualname__},
                    )
                except TypeError:
                    cls = RemoteError
            _remote_classes[original] = cls
        return cls


class _RebuiltRemoteError(RemoteError):
    """Base of the per-type subclasses: never runs the original type's ``__init__``,
    which may need arguments the remote exception did not keep."""

    def __init__(
        self, type_name: str, message: str, remote_traceback: str, reason: str = ""
    ) -> None:
        # The class already says the type: its text is the remote exception's own.
        BaseException.__init__(self, message)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.reason = reason
        self.add_note(f"Remote traceback:\n{remote_traceback.rstrip()}")

    # The original type's own __str__/__repr__ may read attributes that were not kept.
    def __str__(self) -> str:
        return BaseException.__str__(self)

    def __repr__(self) -> str:
        return BaseException.__repr__(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # The class is made at run time: pickle it by what it stands for.
        return (remote_error, (self.type_name, self.message, self.remote_traceback, self.reason))


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
