"""The contract between the ascend client and this runner.

Everything both sides must agree on lives here and nowhere else: the environment
variables that tell the runner what to do, its exit codes, and the envelope that
wraps every pickle in storage.

Envelope layout (all integers big-endian)::

    b"ASCEND\\x01\\n"            8 bytes of magic, the last-but-one byte is the format version
    header length              4 bytes
    header                     UTF-8 JSON: kind, python, cloudpickle, pickle length,
                               out-of-band buffer lengths, blob digests, signature
    pickle                     protocol-5 pickle stream
    buffer 0 .. buffer n-1     out-of-band buffers, back to back (except blobs)

An out-of-band buffer may instead be a *blob*: stored once, under its SHA-256 digest,
in the user's ``blobs/sha256/`` folder, and left out of the envelope. The header lists
each buffer's digest (``null`` for a buffer in the envelope); the signature covers the
digests, and a blob is checked against its digest when it is read, so a large argument
shared by many calls is uploaded once and still cannot be tampered with.

The header can be read without unpickling anything, so the runner refuses a package
made by another Python or cloudpickle *before* running a single byte of it, and the
HMAC signature (over the header fields and the body) is checked before unpickling.

This module imports only the standard library: the runner starts once per call and
every import is paid for in latency.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import json
import pickle
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

MAGIC: Final = b"ASCEND\x01\n"
_LENGTH = struct.Struct(">I")

Buffer = bytes | bytearray | memoryview

# Environment variables read by the runner.
ENV_PACKAGE_URI: Final = "ASCEND_PACKAGE_URI"
"""The function (and, for a single call, its arguments)."""
ENV_RESULT_URI: Final = "ASCEND_RESULT_URI"
"""Where a single call publishes its result."""
ENV_INPUT_URI: Final = "ASCEND_INPUT_URI"
"""For a map: the chunk of inputs to run; ``{index}`` is replaced by the chunk index."""
ENV_RESULTS_URI: Final = "ASCEND_RESULTS_URI"
"""For a map: the folder where item ``i`` publishes ``{i}.pkl``."""
ENV_INDEX: Final = "ASCEND_INDEX"
"""For a map: the chunk index; Kubernetes Indexed Jobs set ``JOB_COMPLETION_INDEX`` instead."""
ENV_COMPLETION_INDEX: Final = "JOB_COMPLETION_INDEX"
ENV_STORAGE_OPTIONS: Final = "ASCEND_STORAGE_OPTIONS"
"""JSON object of fsspec storage options (never credentials: those come as cloud env vars)."""
ENV_SIGNING_KEY: Final = "ASCEND_SIGNING_KEY"
"""Hex key for the HMAC over packages and results; when set, unsigned packages are refused."""
ENV_ATTEMPT: Final = "ASCEND_ATTEMPT"
"""A name for this attempt (pod name, or a counter on the local backend)."""
ENV_LOGS_URI: Final = "ASCEND_LOGS_URI"
"""When set: a folder where the runner stores a copy of its output as ``{attempt}.log``."""
ENV_SKIP_DONE: Final = "ASCEND_SKIP_DONE"
"""When ``1``, items whose result is already published are not run again (retries)."""
ENV_BLOBS_URI: Final = "ASCEND_BLOBS_URI"
"""The folder of content-addressed blobs: a blob is ``{folder}/sha256/{hex digest}``."""
ENV_ENV_URL: Final = "ASCEND_ENV_URL"
"""For the bootstrap: the environment archive (a path, ``file://`` or ``http(s)://`` URL)."""
ENV_ENV_SHA256: Final = "ASCEND_ENV_SHA256"
"""For the bootstrap: the archive's SHA-256 (hex); a different archive is refused."""
ENV_ENV_CACHE: Final = "ASCEND_ENV_CACHE"
"""For the bootstrap: the folder of unpacked environments (default: a temp folder)."""

ENV_RUN_TIMEOUT: Final = "ASCEND_RUN_TIMEOUT"
"""Seconds the runner may run, from its own start (the call's ``timeout``; for a map
chunk, the per-item timeout times its items). Past it the runner stops the function and
exits ``DEADLINE``. Unset: no limit."""
ENV_STARTUP_TIMEOUT: Final = "ASCEND_STARTUP_TIMEOUT"
"""For the bootstrap: seconds that fetching and unpacking the environment may take (the
call's ``startup_timeout``); past it the bootstrap exits ``STARTUP_TIMEOUT``."""
ENV_STARTED_FILE: Final = "ASCEND_STARTED_FILE"
"""For the bootstrap: a file it creates once the environment is unpacked, just before
the runner starts (a Kubernetes startup probe waits for it, which makes the runner's
start visible through the API as the container's ``started``)."""

ENV_CLIENT_PID: Final = "ASCEND_CLIENT_PID"
"""The local backend's client process: the runner stops (as on ``SIGTERM``) when it dies."""

RUNNER_ENV: Final = frozenset(
    {
        ENV_PACKAGE_URI,
        ENV_RESULT_URI,
        ENV_INPUT_URI,
        ENV_RESULTS_URI,
        ENV_INDEX,
        ENV_STORAGE_OPTIONS,
        ENV_SIGNING_KEY,
        ENV_ATTEMPT,
        ENV_LOGS_URI,
        ENV_SKIP_DONE,
        ENV_BLOBS_URI,
        ENV_CLIENT_PID,
        ENV_ENV_URL,
        ENV_ENV_SHA256,
        ENV_ENV_CACHE,
        ENV_RUN_TIMEOUT,
        ENV_STARTUP_TIMEOUT,
        ENV_STARTED_FILE,
    }
)
"""The runner's own variables. It removes them from its environment before running the
function, so the function (and any remote call it makes in turn) never sees them."""


class ExitCode(enum.IntEnum):
    """Exit codes of the runner. Everything from 80 up is reserved by ascend.

    Kubernetes is told (through the Job's pod failure policy) not to retry any of the
    reserved codes: a user exception or a broken package fails the same way every time.
    """

    OK = 0
    """Every item ran and its result is published."""
    USER_EXCEPTION = 81
    """The function raised; the exception is published as the result."""
    PACKAGE_UNREADABLE = 82
    """The package or input could not be read, verified or unpickled."""
    VERSION_MISMATCH = 83
    """The package was made by another Python major.minor or cloudpickle version."""
    RESULT_UNWRITABLE = 84
    """The result could not be written to storage."""
    BAD_INVOCATION = 85
    """The runner was started without the environment it needs."""
    OUTPUT_LOST = 86
    """The runner's output pipe closed under the function (its client died): nothing was
    published, since the resulting ``BrokenPipeError`` is not the function's answer."""
    TERMINATED = 87
    """The runner got ``SIGTERM`` (the call was cancelled, its client died, the pod was
    evicted or deleted) or its client process died: it stopped the function at once and
    published nothing. A retry can fix it (as ``DEADLINE``), so not in :meth:`reserved`."""
    ENVIRONMENT_UNAVAILABLE = 88
    """The bootstrap could not fetch, verify or unpack the function's environment."""
    DEADLINE = 89
    """The function ran past ``ASCEND_RUN_TIMEOUT`` (its ``timeout``): the runner stopped
    it and published nothing. Retried up to ``retries`` (a timeout may be a slow node),
    so not in :meth:`reserved`."""
    STARTUP_TIMEOUT = 90
    """Fetching and unpacking the environment took longer than ``ASCEND_STARTUP_TIMEOUT``
    (the call's ``startup_timeout``): the bootstrap gave up before the runner started."""

    @classmethod
    def reserved(cls) -> list[int]:
        """The codes a retry cannot fix."""
        return [int(code) for code in cls if code not in (cls.OK, cls.TERMINATED, cls.DEADLINE)]


SERIALIZATION_ERROR: Final = "ascend.SerializationError"
"""The ``type`` of an error result whose cause is ascend's, not the function's: the
return value could not be pickled. The client raises ``ascend.SerializationError``."""

DIAGNOSTIC_PREFIX: Final = "ascend-runner: "
"""The runner's own stderr lines start with this; the last one names the failure."""
# Map items in a chunk are announced in the output: see ascend_runner.framing.


@functools.cache
def runtime_versions() -> dict[str, str]:
    """The Python major.minor and cloudpickle version of this interpreter."""
    import cloudpickle

    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "cloudpickle": str(cloudpickle.__version__),
    }


class EnvelopeError(Exception):
    """Bytes that are not a valid ascend envelope (truncated, foreign, tampered)."""


class SignatureError(EnvelopeError):
    """The envelope's HMAC does not match: it was not written by a holder of the key."""


class Header:
    """What an envelope says about itself before anything is unpickled.

    A plain class rather than a dataclass: the runner imports this module on every call,
    and building a dataclass costs more start-up time than the rest of the module.
    """

    __slots__ = (
        "blobs",
        "buffer_lengths",
        "cloudpickle",
        "kind",
        "pickle_length",
        "python",
        "signature",
    )

    def __init__(
        self,
        kind: str,
        python: str,
        cloudpickle: str,
        pickle_length: int,
        buffer_lengths: tuple[int, ...],
        signature: str | None = None,
        blobs: tuple[str | None, ...] = (),
    ) -> None:
        self.kind = kind
        self.python = python
        self.cloudpickle = cloudpickle
        self.pickle_length = pickle_length
        self.buffer_lengths = buffer_lengths
        self.signature = signature
        self.blobs = blobs or (None,) * len(buffer_lengths)

    def _signed_fields(self) -> bytes:
        fields: list[Any] = [
            self.kind,
            self.python,
            self.cloudpickle,
            self.pickle_length,
            self.buffer_lengths,
        ]
        if any(self.blobs):
            fields.append(self.blobs)
        return json.dumps(fields, separators=(",", ":")).encode()

    @property
    def inline_length(self) -> int:
        """Bytes of pickle and buffers inside the envelope (blobs are outside)."""
        return self.pickle_length + sum(
            n for n, blob in zip(self.buffer_lengths, self.blobs, strict=True) if blob is None
        )

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "kind": self.kind,
                "python": self.python,
                "cloudpickle": self.cloudpickle,
                "pickle_length": self.pickle_length,
                "buffer_lengths": list(self.buffer_lengths),
                "blobs": list(self.blobs) if any(self.blobs) else None,
                "signature": self.signature,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview) -> Header:
        try:
            data = json.loads(bytes(raw))
            lengths = tuple(int(n) for n in data["buffer_lengths"])
            blobs = tuple(
                None if b is None else _checked_digest(b) for b in data.get("blobs") or ()
            )
            if blobs and len(blobs) != len(lengths):
                raise ValueError("one blob entry per buffer expected")
            return cls(
                kind=str(data["kind"]),
                python=str(data["python"]),
                cloudpickle=str(data["cloudpickle"]),
                pickle_length=int(data["pickle_length"]),
                buffer_lengths=lengths,
                signature=data.get("signature"),
                blobs=blobs,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise EnvelopeError(f"unreadable envelope header: {exc}") from exc


def _checked_digest(value: Any) -> str:
    text = str(value)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"blob digest {text!r} is not a SHA-256 hex digest")
    return text


def blob_url(folder: str, digest: str) -> str:
    """Where the blob with this SHA-256 hex digest is stored."""
    return f"{folder.rstrip('/')}/sha256/{digest}"


def _mac(key: bytes, header: Header, body: Sequence[Buffer]) -> str:
    mac = hmac.new(key, header._signed_fields(), hashlib.sha256)
    for part in body:
        mac.update(part)
    return mac.hexdigest()


def encode(
    kind: str,
    pickled: Buffer,
    buffers: Sequence[Buffer] = (),
    *,
    key: bytes | None = None,
    versions: dict[str, str] | None = None,
    blobs: Sequence[str | None] = (),
) -> list[Buffer]:
    """Wrap a pickle and its out-of-band buffers; returns the parts to write in order.

    The parts are not joined, so a large buffer is never copied on its way to storage.
    ``blobs[i]``, when given and not ``None``, is the SHA-256 hex digest of buffer ``i``,
    which the caller stores as a blob: it is left out of the envelope.
    """
    versions = versions or runtime_versions()
    views = [memoryview(b).cast("B") for b in buffers]
    header = Header(
        kind=kind,
        python=versions["python"],
        cloudpickle=versions["cloudpickle"],
        pickle_length=len(pickled),
        buffer_lengths=tuple(v.nbytes for v in views),
        blobs=tuple(blobs),
    )
    inline = [v for v, blob in zip(views, header.blobs, strict=True) if blob is None]
    if key is not None:
        header.signature = _mac(key, header, [pickled, *inline])
    raw_header = header.to_bytes()
    return [MAGIC, _LENGTH.pack(len(raw_header)), raw_header, pickled, *inline]


def body_length(parts: Sequence[Buffer]) -> int:
    """Bytes of pickle and inline buffers in the parts :func:`encode` returned."""
    return sum(memoryview(part).nbytes for part in parts[3:])


def read_header(data: Buffer) -> tuple[Header, int]:
    """Parse the header; returns it and the offset where the pickle starts."""
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise EnvelopeError("not an ascend envelope (bad magic bytes)")
    start = len(MAGIC) + _LENGTH.size
    if len(view) < start:
        raise EnvelopeError("truncated envelope")
    (length,) = _LENGTH.unpack(view[len(MAGIC) : start])
    header = Header.from_bytes(view[start : start + length])
    return header, start + length


def split_body(
    data: Buffer,
    header: Header,
    offset: int,
    *,
    key: bytes | None,
    fetch_blob: Callable[[str], Buffer] | None = None,
) -> tuple[memoryview, list[memoryview]]:
    """Return the pickle and buffers of an envelope, after checking size and signature.

    Blobs are read with ``fetch_blob(digest)`` once the signature is checked, and each is
    verified against its digest.
    """
    view = memoryview(data)
    expected = offset + header.inline_length
    if len(view) != expected:
        raise EnvelopeError(f"envelope is {len(view)} bytes, its header promises {expected}")
    pickled = view[offset : offset + header.pickle_length]
    inline: list[memoryview] = []
    position = offset + header.pickle_length
    for length, blob in zip(header.buffer_lengths, header.blobs, strict=True):
        if blob is None:
            inline.append(view[position : position + length])
            position += length
    if key is not None:
        if header.signature is None:
            raise SignatureError("envelope is not signed, but a signing key is configured")
        if not hmac.compare_digest(header.signature, _mac(key, header, [pickled, *inline])):
            raise SignatureError("envelope signature does not match its contents")
    buffers: list[memoryview] = []
    pending = iter(inline)
    fetched: dict[str, memoryview] = {}  # each blob is read once, however often it is used
    for length, blob in zip(header.buffer_lengths, header.blobs, strict=True):
        if blob is None:
            buffers.append(next(pending))
            continue
        if fetch_blob is None:
            raise EnvelopeError(f"the {header.kind} refers to blob {blob}, but no blob store")
        content = fetched.get(blob)
        if content is None:
            content = fetched[blob] = memoryview(fetch_blob(blob))
            if content.nbytes != length or hashlib.sha256(content).hexdigest() != blob:
                raise EnvelopeError(
                    f"blob {blob} does not match its digest or length (it was stored "
                    "damaged; delete it from the blobs folder and the next call that needs "
                    "it uploads it again)"
                )
        elif content.nbytes != length:
            raise EnvelopeError(f"blob {blob} is used with two different lengths")
        buffers.append(content)
    return pickled, buffers


def version_mismatch(header: Header, ours: dict[str, str]) -> str | None:
    """A message naming both sides' versions when they differ, else ``None``."""
    if header.python == ours["python"] and header.cloudpickle == ours["cloudpickle"]:
        return None
    return (
        f"the {header.kind} was made by Python {header.python} with cloudpickle "
        f"{header.cloudpickle}, but this runner has Python {ours['python']} with cloudpickle "
        f"{ours['cloudpickle']}. Fix: run with the runner image for Python {header.python} "
        f"(image=... or ASCEND_IMAGE) and install cloudpickle=={ours['cloudpickle']} on the "
        f"client, or cloudpickle=={header.cloudpickle} in the image."
    )


LARGE_BYTES: Final = 1 << 20
"""``bytes`` of at least this size travel as out-of-band pickle buffers."""


class _OutOfBandBytes:
    """Stands in for a large ``bytes`` so pickle protocol 5 ships it out of band.

    Pickle never offers plain ``bytes`` to a reducer hook, so large ones are swapped for
    this wrapper before pickling; it unpickles back to plain ``bytes``.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if isinstance(protocol, int) and protocol >= 5:
            return (bytes, (pickle.PickleBuffer(self.data),))
        return (bytes, (self.data,))


def loads_nested(pickled: Buffer, *buffers: Buffer) -> Any:
    """Unpickle an argument that was pickled on its own (see ``ascend._serialization``).

    A large argument travels as one out-of-band buffer holding its own pickle, so it can
    be stored once as a blob and shared by every call that passes it.
    """
    return pickle.loads(pickled, buffers=buffers)


def lift_large_bytes(value: Any) -> Any:
    """A large ``bytes`` value swapped for its out-of-band stand-in; anything else as is.

    Only the value itself is swapped, never an element of a container: rebuilding a
    container would give it a new identity, and pickle must keep the identity and the
    shape of everything it is given (a dict that contains itself, one list referenced
    from two places). ``bytes`` inside containers travel inside the pickle.
    """
    if type(value) is bytes and len(value) >= LARGE_BYTES:
        return _OutOfBandBytes(value)
    return value


def remote_function(fn: Any, resources: dict[str, Any], binds: str | None) -> Any:
    """Rebuild a pickled ``ascend.RemoteFunction`` (a class attribute of a class shipped
    by value, a global of the function).

    Where ascend is not installed — a runner image has only this package — a stand-in
    takes its place: the class still unpickles and its other methods work, and calling
    the remote function there says what is missing.
    """
    try:
        import importlib

        rebuild = importlib.import_module("ascend._remote")._rebuild
    except ImportError:
        return _RemoteFunctionUnavailable(fn, resources, binds)
    return rebuild(fn, resources, binds)


class _RemoteFunctionUnavailable:
    """Stands in for an ``ascend.RemoteFunction`` where ascend is not installed."""

    def __init__(self, fn: Any, resources: dict[str, Any], binds: str | None) -> None:
        self.__wrapped__ = fn
        self._state = (fn, resources, binds)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        name = getattr(self.__wrapped__, "__qualname__", repr(self.__wrapped__))
        raise RuntimeError(
            f"the remote function {name} cannot submit calls from here: the package "
            "ascend-k8s is not installed where this code runs. Fix: add 'ascend-k8s' to "
            "requirements=[...] (or to the image) to call remote functions remotely."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Back on the client it is the remote function again.
        return (remote_function, self._state)


def parse_indexes(spec: str) -> Iterator[int]:
    """Expand a Kubernetes-style index list such as ``"0-3,7,9-10"``."""
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, _, last = part.partition("-")
        yield from range(int(first), int(last or first) + 1)


def load_json_env(value: str | None) -> dict[str, Any]:
    """Decode an optional JSON object from an environment variable."""
    if not value:
        return {}
    decoded = json.loads(value)
    if not isinstance(decoded, dict):
        raise ValueError("expected a JSON object")
    return decoded
