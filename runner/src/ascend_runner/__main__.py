"""Run one pickled call (or one chunk of a map) and publish its result once.

Invoked as ``python -u -m ascend_runner`` with the environment described in
:mod:`ascend_runner.protocol`. Exit codes are :class:`~ascend_runner.protocol.ExitCode`.

Lifecycle: the runner takes its own variables out of the environment before running the
function; on ``SIGTERM`` (or when its local client dies) it stops the function at once,
stops what the function started in its process group, publishes nothing and exits with
``TERMINATED``; once the results are published it exits at once, without waiting for
threads or processes the function left behind (they end with it: the local backend kills
the runner's process group, a pod's container ends with its first process).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
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
    with contextlib.suppress(OSError, ValueError):  # nobody may be reading any more
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


def _user_frames(tb: Any) -> Any:
    """The traceback from the first frame of the user's code: the runner's own frames,
    and asyncio's when it ran an ``async def``, are left out."""
    folders = [os.path.dirname(__file__)]
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and asyncio.__file__:
        folders.append(os.path.dirname(asyncio.__file__))
    prefixes = tuple(os.path.join(folder, "") for folder in folders)
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(prefixes):
        tb = tb.tb_next
    return tb


def _format_traceback(exc: BaseException) -> str:
    """The traceback text, minus the runner's own frames.

    cloudpickle names the file of code it shipped by value ``<dynamic-code>``; each
    such frame is labelled with its module so the client can show the source lines
    from its own copy of the file.
    """
    tb = _user_frames(exc.__traceback__)
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


def _describe(exc: BaseException) -> tuple[str, str]:
    """The exception's type name and message; never raises (a broken ``__str__`` too)."""
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except Exception as error:
        message = f"<str() of the exception failed: {error!r}>"
    return name, message


def _error_payload(exc: BaseException) -> dict[str, Any]:
    """What the client needs to raise the exception again (see ``protocol``)."""
    import cloudpickle

    name, message = _describe(exc)
    pickled: bytes | None = None
    rebuild_error: str | None = None
    if not isinstance(exc, Exception):
        rebuild_error = f"{name} is not an Exception (the client must not exit or stop on it)"
    else:
        try:
            pickled = cloudpickle.dumps(exc)
        except Exception as error:
            rebuild_error = f"it cannot be pickled: {error!r}"
        else:
            try:  # an __init__ that needs other arguments than it keeps fails here
                cloudpickle.loads(pickled)
            except Exception as error:
                pickled = None
                rebuild_error = f"it cannot be rebuilt from its pickle: {error!r}"
    attributes: dict[str, bytes] = {}
    if rebuild_error is not None:  # the client rebuilds what it can of it
        left: list[str] = []
        for attribute, value in list(vars(exc).items()):
            if attribute.startswith("__"):
                continue
            try:
                attributes[attribute] = cloudpickle.dumps(value)
            except Exception as error:
                left.append(f"{attribute} ({type(error).__name__})")
        if left:
            rebuild_error += f"; attributes left behind: {', '.join(left)}"
    try:
        text = _format_traceback(exc)
    except Exception as error:  # a traceback that cannot be formatted is not the answer
        text = f"{name}: {message}\n(the traceback could not be formatted: {error!r})\n"
    return {
        "type": name,
        "message": message,
        "traceback": text,
        "exception": pickled,
        "rebuild_error": rebuild_error,
        "attributes": attributes,
    }


def _unpicklable_result(fn: Callable[..., Any], value: Any, exc: BaseException) -> dict[str, Any]:
    """The error payload for a return value that cannot be pickled (an ascend error)."""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    kind = type(value).__name__
    if isinstance(value, Iterator | AsyncIterator | Coroutine):
        hint = "return a list (list(...)) instead of a generator or iterator"
    elif isinstance(exc, RecursionError) or "recursion" in str(exc):
        hint = "return a flatter structure: this one nests deeper than Python's recursion limit"
    else:
        hint = (
            "return plain data (numbers, strings, lists, dicts, arrays) or objects that pickle; "
            "open files, locks, sockets and clients cannot leave the process that made them"
        )
    message = f"the return value of {name}() (a {kind}) cannot be pickled: {exc!r}. Fix: {hint}."
    return {
        "type": p.SERIALIZATION_ERROR,
        "message": message,
        "traceback": "",
        "exception": None,
        "rebuild_error": None,
    }


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call the function; an ``async def`` (any coroutine it returns) is run to its end."""
    value = fn(*args, **kwargs)
    if isinstance(value, Coroutine):
        import asyncio

        value = asyncio.run(value)
    return value


def _outcome(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], key: bytes | None
) -> tuple[list[p.Buffer], bool]:
    """Run the function; returns the encoded result and whether it raised."""
    import cloudpickle

    try:
        value = _call(fn, args, kwargs)
    except BaseException as exc:
        _check_plumbing(exc)
        payload: tuple[str, Any] = ("error", _error_payload(exc))
        failed = True
    else:
        payload, failed = ("ok", p.lift_large_bytes(value)), False
    buffers: list[Any] = []
    try:
        pickled = cloudpickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        buffers = []
        payload = ("error", _unpicklable_result(fn, payload[1], exc))
        pickled = cloudpickle.dumps(payload, protocol=5)
        failed = True
    raws = [b.raw() for b in buffers]
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        # A thread the function left running could change a returned array between
        # signing and writing it: sign and write a copy (only then, to spare memory).
        raws = [r if type(r.obj) is bytes else memoryview(r.tobytes()) for r in raws]
    return p.encode("result", pickled, raws, key=key), failed


def _check_plumbing(exc: BaseException) -> None:
    """Refuse to publish a failure of the runner's own output pipe as the answer."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.EPIPE and _output_closed():
            raise _Abort(
                p.ExitCode.OUTPUT_LOST,
                "the runner's output pipe closed while the function ran (its client is "
                f"gone), so its {type(exc).__name__} is not published as the result",
            )
        error = error.__cause__ or error.__context__


def _output_closed() -> bool:
    """True when nothing reads stdout or stderr any more (a pipe whose reader is gone)."""
    poll = getattr(select, "poll", None)
    if poll is None:
        return False
    poller = poll()
    for fd in (1, 2):
        with contextlib.suppress(OSError, ValueError):
            poller.register(fd, 0)
    return any(event & (select.POLLERR | select.POLLNVAL) for _, event in poller.poll(0))


_stopping: list[p.ExitCode] = []  # set once the runner stops itself (its timeout)


def _terminate(signum: int = signal.SIGTERM, frame: object = None) -> None:
    """Stop now: publish nothing, stop the function's own processes, exit TERMINATED."""
    if _stopping:  # our own SIGTERM to the group, sent while stopping for another reason
        os._exit(_stopping[0])
    _stop_now(p.ExitCode.TERMINATED, f"terminated (signal {signum}); nothing published")


def _stop_now(code: p.ExitCode, diagnostic: str) -> NoReturn:
    """Say why, stop the function's own processes, exit with ``code`` (from any thread)."""
    _stopping.append(code)
    with contextlib.suppress(Exception):
        os.write(2, f"{p.DIAGNOSTIC_PREFIX}{diagnostic}\n".encode())
    if os.getpgrp() == os.getpid():  # only a group of its own: never the caller's
        with contextlib.suppress(OSError, ValueError):  # ValueError: not the main thread
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(OSError):
            os.killpg(os.getpid(), signal.SIGTERM)
    os._exit(code)


def _enforce_run_timeout(value: str | None) -> None:
    """Stop the function once it has run ``value`` seconds, counted from the runner's
    start: the bootstrap's environment fetch and the pod's start before it count against
    ``startup_timeout`` instead, so a slow start never eats the run's budget."""
    if not value:
        return
    try:
        seconds = float(value)
    except ValueError:
        _say(f"ignoring {p.ENV_RUN_TIMEOUT}={value!r}: not a number of seconds")
        return

    def expire() -> None:
        _stop_now(
            p.ExitCode.DEADLINE,
            f"the function ran past its timeout of {seconds:g} s (counted from the runner's "
            "start) and was stopped; nothing published",
        )

    timer = threading.Timer(seconds, expire)
    timer.name = "ascend-run-timeout"
    timer.daemon = True
    timer.start()


def _die_with_client(client_pid: str | None) -> None:
    """Make the runner stop when the local client that started it dies, however it dies."""
    if not client_pid:
        return
    try:
        pid = int(client_pid)
    except ValueError:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            pr_set_pdeathsig = 1
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) == 0:
                if os.getppid() != pid:  # it died before that took effect
                    _terminate()
                return

    def watch() -> None:  # elsewhere: notice the parent change (reparenting)
        while os.getppid() == pid:
            threading.Event().wait(0.5)
        _terminate()

    threading.Thread(target=watch, name="ascend-client-watch", daemon=True).start()


def _publish(url: str, parts: list[p.Buffer], options: dict[str, Any], attempt: str) -> None:
    try:
        if not _storage.publish_once(url, parts, options, attempt):
            _say(f"a result is already published at {url}; this attempt's result is dropped")
    except Exception as exc:
        raise _Abort(
            p.ExitCode.RESULT_UNWRITABLE, f"cannot write the result {url}: {exc!r}"
        ) from exc


def _run(env: dict[str, str]) -> int:
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
            _announce(item)
        parts, failed = _outcome(fn, args, kwargs, key)
        any_failed |= failed
        _publish(url, parts, options, attempt)
    sys.stdout.flush()
    return p.ExitCode.USER_EXCEPTION if any_failed else p.ExitCode.OK


def _announce(item: int) -> None:
    """Mark where a map item's output starts (see :mod:`ascend_runner.framing`).

    What the previous item left in Python's buffers goes out first, so the marker
    follows all of it; the marker goes straight to the file descriptor, after them.
    """
    from ascend_runner.framing import item_marker

    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        flush = getattr(stream, "flush", None)
        if flush is not None:
            with contextlib.suppress(OSError, ValueError):  # closed by the function
                flush()
    data = memoryview(item_marker(item))
    # Nobody reading the output any more is no reason to fail the item.
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(2, data) :]


def main() -> NoReturn:
    """Entry point of ``python -m ascend_runner`` and the ``ascend-runner`` script."""
    from ascend_runner._output import buffer_output

    buffer_output()  # prompt but not line by line: see ascend_runner._output
    signal.signal(signal.SIGTERM, _terminate)
    # The function sees none of the runner's own variables: a remote call it makes in
    # turn must not pick up this one's package, results or index.
    env = dict(os.environ)
    for name in p.RUNNER_ENV:
        os.environ.pop(name, None)
    _die_with_client(env.get(p.ENV_CLIENT_PID))
    _enforce_run_timeout(env.get(p.ENV_RUN_TIMEOUT))
    logs_uri = env.get(p.ENV_LOGS_URI)
    copy = None
    if logs_uri:  # imported only when used: every import delays each call's start
        from ascend_runner._output import OutputCopy, before_hard_exit

        copy = kept = OutputCopy()
        uri = logs_uri
        # A function that calls os._exit (or a SIGTERM) ends the process before the
        # copy's pump has passed the last output on to the pod log: drain and keep it.
        before_hard_exit(lambda: _keep_output(kept, uri, env))
    try:
        code = _run(env)
    except _Abort as abort:
        _say(str(abort))
        code = abort.code
    finally:
        if copy is not None and logs_uri:
            _keep_output(copy, logs_uri, env)
    # Exit now: threads and processes the function left behind must not hold back the
    # call's end (os._exit skips waiting for non-daemon threads).
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(code))


def _keep_output(copy: OutputCopy, logs_uri: str, env: dict[str, str]) -> None:
    from ascend_runner._output import upload

    data = copy.finish()
    if not data:  # nothing printed: no file, and one storage request less per call
        return
    attempt = env.get(p.ENV_ATTEMPT) or str(os.getpid())
    try:
        options = p.load_json_env(env.get(p.ENV_STORAGE_OPTIONS))
        upload(f"{logs_uri.rstrip('/')}/{attempt}.log", data, options)
    except Exception as exc:  # the call's outcome matters more than its log copy
        _say(f"could not store a copy of the output: {exc!r}")


if __name__ == "__main__":
    main()
