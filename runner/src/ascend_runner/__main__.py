"""Run one pickled call (or one chunk of a map) and publish its result once.

Invoked as ``python -u -m ascend_runner`` with the environment described in
:mod:`ascend_runner.protocol`. Exit codes are :class:`~ascend_runner.protocol.ExitCode`.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from ascend_runner import _storage
from ascend_runner import protocol as p

if TYPE_CHECKING:
    from ascend_runner._output import OutputCopy


class _Abort(Exception):
    """Stop the runner with a reserved exit code and a last diagnostic line."""

    def __init__(self, code: p.ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _say(message: str) -> None:
    print(f"{p.DIAGNOSTIC_PREFIX}{message}", file=sys.stderr, flush=True)


def _read(url: str, what: str, options: dict[str, Any], *, large: bool = False) -> p.Buffer:
    try:
        return _storage.read_bytes(url, options, large=large)
    except Exception as exc:
        raise _Abort(
            p.ExitCode.PACKAGE_UNREADABLE, f"cannot read the {what} {url}: {exc!r}"
        ) from exc


def _load(
    url: str, what: str, key: bytes | None, options: dict[str, Any], blobs: str | None
) -> Any:
    data = _read(url, what, options)

    def fetch_blob(digest: str) -> p.Buffer:
        if not blobs:
            raise p.EnvelopeError(f"it refers to blob {digest}, but {p.ENV_BLOBS_URI} is not set")
        return _read(p.blob_url(blobs, digest), f"blob of the {what}", options, large=True)

    try:
        header, offset = p.read_header(data)
        mismatch = p.version_mismatch(header, p.runtime_versions())
        if mismatch is not None:
            raise _Abort(p.ExitCode.VERSION_MISMATCH, f"VersionMismatch: {mismatch}")
        pickled, buffers = p.split_body(data, header, offset, key=key, fetch_blob=fetch_blob)
    except p.EnvelopeError as exc:
        raise _Abort(p.ExitCode.PACKAGE_UNREADABLE, f"refusing the {what} {url}: {exc}") from exc
    import cloudpickle

    try:
        return cloudpickle.loads(pickled, buffers=buffers)
    except Exception as exc:
        raise _Abort(
            p.ExitCode.PACKAGE_UNREADABLE,
            f"cannot unpickle the {what} {url}: {exc!r} (is a module the function needs "
            "missing from the image? add it to requirements=[...])",
        ) from exc


def _format_traceback(exc: BaseException) -> str:
    """The traceback text, minus the runner's own frame.

    cloudpickle names the file of code it shipped by value ``<dynamic-code>``; each
    such frame is labelled with its module so the client can show the source lines
    from its own copy of the file.
    """
    tb = exc.__traceback__.tb_next if exc.__traceback__ else None
    formatted = traceback.TracebackException(type(exc), exc, tb)
    todo: list[tuple[traceback.TracebackException, BaseException, Any]] = [(formatted, exc, tb)]
    while todo:
        summary, error, error_tb = todo.pop()
        for frame_summary, (frame, _) in zip(
            summary.stack, traceback.walk_tb(error_tb), strict=False
        ):
            if frame_summary.filename == "<dynamic-code>":
                module = frame.f_globals.get("__name__", "?")
                frame_summary.filename = f"<dynamic-code:{module}>"
        for chained_summary, chained in (
            (summary.__cause__, error.__cause__),
            (summary.__context__, error.__context__),
        ):
            if chained_summary is not None and chained is not None:
                todo.append((chained_summary, chained, chained.__traceback__))
    return "".join(formatted.format())


def _error_payload(exc: BaseException) -> dict[str, Any]:
    import cloudpickle

    try:
        pickled: bytes | None = cloudpickle.dumps(exc) if isinstance(exc, Exception) else None
    except Exception:
        pickled = None
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": _format_traceback(exc),
        "exception": pickled,
    }


def _outcome(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], key: bytes | None
) -> tuple[list[p.Buffer], bool]:
    """Run the function; returns the encoded result and whether it raised."""
    import cloudpickle

    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        payload: tuple[str, Any] = ("error", _error_payload(exc))
        failed = True
    else:
        payload, failed = ("ok", p.lift_large_bytes(value)), False
    buffers: list[Any] = []
    try:
        pickled = cloudpickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        import pickle

        error = pickle.PicklingError(f"the return value of {name}() cannot be pickled: {exc!r}")
        buffers = []
        pickled = cloudpickle.dumps(("error", _error_payload(error)), protocol=5)
        failed = True
    raws = [b.raw() for b in buffers]
    return p.encode("result", pickled, raws, key=key), failed


def _publish(url: str, parts: list[p.Buffer], options: dict[str, Any], attempt: str) -> None:
    try:
        if not _storage.publish_once(url, parts, options, attempt):
            _say(f"a result is already published at {url}; this attempt's result is dropped")
    except Exception as exc:
        raise _Abort(
            p.ExitCode.RESULT_UNWRITABLE, f"cannot write the result {url}: {exc!r}"
        ) from exc


def _run(env: os._Environ[str] | dict[str, str]) -> int:
    package_uri = env.get(p.ENV_PACKAGE_URI)
    result_uri = env.get(p.ENV_RESULT_URI)
    input_uri = env.get(p.ENV_INPUT_URI)
    results_uri = env.get(p.ENV_RESULTS_URI)
    if not package_uri or not (result_uri or (input_uri and results_uri)):
        raise _Abort(
            p.ExitCode.BAD_INVOCATION,
            f"set {p.ENV_PACKAGE_URI} and either {p.ENV_RESULT_URI} or "
            f"{p.ENV_INPUT_URI} + {p.ENV_RESULTS_URI}",
        )
    try:
        options = p.load_json_env(env.get(p.ENV_STORAGE_OPTIONS))
        key = bytes.fromhex(env[p.ENV_SIGNING_KEY]) if env.get(p.ENV_SIGNING_KEY) else None
    except ValueError as exc:
        raise _Abort(p.ExitCode.BAD_INVOCATION, f"malformed environment: {exc}") from exc
    attempt = env.get(p.ENV_ATTEMPT) or str(os.getpid())
    skip_done = env.get(p.ENV_SKIP_DONE) == "1"
    blobs = env.get(p.ENV_BLOBS_URI)

    package = _load(package_uri, "package", key, options, blobs)
    fn = package["fn"]
    work: list[tuple[int | None, tuple[Any, ...], dict[str, Any], str]] = []
    if result_uri:
        work.append((None, package["args"], package["kwargs"], result_uri))
    else:
        assert input_uri is not None and results_uri is not None
        index = env.get(p.ENV_INDEX) or env.get(p.ENV_COMPLETION_INDEX)
        if index is None:
            raise _Abort(
                p.ExitCode.BAD_INVOCATION,
                f"a map chunk needs {p.ENV_INDEX} or {p.ENV_COMPLETION_INDEX}",
            )
        inline = package.get("inputs")
        if inline is None:
            chunk = _load(input_uri.replace("{index}", index), "input", key, options, blobs)
        else:  # a small map's inputs travel in its package: one storage read less per pod
            try:
                chunk = inline[int(index)]
            except (ValueError, IndexError) as exc:
                raise _Abort(
                    p.ExitCode.BAD_INVOCATION, f"the package holds no input {index!r}: {exc!r}"
                ) from exc
        base = results_uri.rstrip("/")
        for offset, (args, kwargs) in enumerate(chunk["items"]):
            item = chunk["first"] + offset
            work.append((item, args, kwargs, f"{base}/{item}.pkl"))

    any_failed = False
    for item, args, kwargs, url in work:
        if skip_done and _storage.exists(url, options):
            continue
        if item is not None and len(work) > 1:
            # Lets the client attribute the output that follows (see protocol.ITEM_MARKER).
            print(f"{p.ITEM_MARKER}{item}", file=sys.stderr, flush=True)
        parts, failed = _outcome(fn, args, kwargs, key)
        any_failed |= failed
        _publish(url, parts, options, attempt)
    sys.stdout.flush()
    return p.ExitCode.USER_EXCEPTION if any_failed else p.ExitCode.OK


def main() -> NoReturn:
    """Entry point of ``python -m ascend_runner`` and the ``ascend-runner`` script."""
    # Output must reach the log stream line by line even without ``python -u``.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    logs_uri = os.environ.get(p.ENV_LOGS_URI)
    copy = None
    if logs_uri:  # imported only when used: every import delays each call's start
        from ascend_runner._output import OutputCopy

        copy = OutputCopy()
    try:
        code = _run(os.environ)
    except _Abort as abort:
        _say(str(abort))
        code = abort.code
    finally:
        if copy is not None and logs_uri:
            _keep_output(copy, logs_uri)
    sys.exit(int(code))


def _keep_output(copy: OutputCopy, logs_uri: str) -> None:
    from ascend_runner._output import upload

    data = copy.finish()
    if not data:  # nothing printed: no file, and one storage request less per call
        return
    attempt = os.environ.get(p.ENV_ATTEMPT) or str(os.getpid())
    try:
        options = p.load_json_env(os.environ.get(p.ENV_STORAGE_OPTIONS))
        upload(f"{logs_uri.rstrip('/')}/{attempt}.log", data, options)
    except Exception as exc:  # the call's outcome matters more than its log copy
        _say(f"could not store a copy of the output: {exc!r}")


if __name__ == "__main__":
    main()
