"""Start the runner inside a function's environment, on a stock Python.

Standard library only: this file runs on the base image's own ``python`` (``python -c``
with this source on Kubernetes, ``python -I -S <this file>`` on the local backend)
before anything of ascend is installed. It

1. reads ``ASCEND_ENV_URL`` (a path, ``file://`` or a presigned ``http(s)://`` URL) and
   ``ASCEND_ENV_SHA256``;
2. unless ``{cache}/{sha256}`` is already unpacked, downloads the archive (3 tries),
   checks its SHA-256, unpacks it (``tarfile``'s ``data`` filter: no absolute paths,
   links out of the folder or device files) into a fresh folder and renames that into
   place, so concurrent starts on one node never see half an environment;
3. creates ``ASCEND_STARTED_FILE`` when set (a Kubernetes startup probe waits for it),
   puts the folder on ``sys.path`` (with its ``.pth`` files) and runs
   ``ascend_runner`` as ``__main__``.

A failure exits with code 88 (``ExitCode.ENVIRONMENT_UNAVAILABLE``) and a last line
starting ``ascend-runner: ``. With ``ASCEND_STARTUP_TIMEOUT`` (seconds), steps 1-2 that
take longer than that (a store that stalls, a huge archive) exit with code 90
(``ExitCode.STARTUP_TIMEOUT``) instead: the runner never started, so the call's
``timeout`` was not touched.
"""

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from typing import NoReturn

EXIT_UNAVAILABLE = 88
EXIT_STARTUP_TIMEOUT = 90
_work: list[str] = []  # the folder being unpacked into, removed when the time is up
_expiring = threading.Event()  # the startup watchdog fired: it exits, with its own code
PREFIX = "ascend-runner: "


def fail(message: str) -> NoReturn:
    if _expiring.is_set():
        # The watchdog is removing the folder this thread was unpacking into (hence this
        # failure): the process ends with the watchdog's startup-timeout code, not 88.
        threading.Event().wait()
    print(PREFIX + "environment unavailable: " + message, file=sys.stderr, flush=True)
    sys.exit(EXIT_UNAVAILABLE)


def fetch(url: str, dest: str) -> None:
    if url.startswith(("http://", "https://")):
        import urllib.request

        last: Exception | None = None
        for attempt in range(3):
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:  # noqa: S310 (http(s) only)
                    shutil.copyfileobj(response, f, 1 << 20)
                return
            except OSError as exc:
                last = exc
                time.sleep(1 + 2 * attempt)
        fail("cannot download the environment archive (3 tries): " + repr(last))
    path = url[len("file://") :] if url.startswith("file://") else url
    if "://" in path:
        fail("cannot fetch " + url + ": only paths, file:// and http(s):// URLs are supported")
    if "%" in path:
        from urllib.parse import unquote

        path = unquote(path)
    try:
        shutil.copyfile(path, dest)
    except OSError as exc:
        fail("cannot read the environment archive " + path + ": " + repr(exc))


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unpacked(url: str, digest: str, cache: str) -> str:
    """The folder holding the environment, unpacked once per node and digest."""
    folder = os.path.join(cache, digest)
    if os.path.isfile(os.path.join(folder, ".complete")):
        return folder
    os.makedirs(cache, exist_ok=True)
    work = tempfile.mkdtemp(prefix=digest[:12] + ".", dir=cache)
    _work.append(work)
    try:
        archive = os.path.join(work, "env.tar.gz")
        fetch(url, archive)
        actual = sha256_of(archive)
        if actual != digest:
            fail("the archive " + url + " has SHA-256 " + actual + ", expected " + digest)
        tree = os.path.join(work, "env")
        with tarfile.open(archive, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tree, filter="data")
            else:  # Python < 3.11.4: the archive's digest was checked above
                tar.extractall(tree)  # noqa: S202
        open(os.path.join(tree, ".complete"), "w").close()
        try:
            os.rename(tree, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, ".complete")):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def startup_watchdog(value: str | None, url: str) -> "threading.Timer | None":
    """A timer that ends the process once ``value`` seconds have passed (from any wait:
    a read that never returns cannot be interrupted otherwise)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None

    def expire() -> None:
        _expiring.set()
        for work in _work:
            shutil.rmtree(work, ignore_errors=True)
        # A presigned URL's query is a credential: never print it.
        message = (
            PREFIX
            + "startup timeout: still fetching and unpacking the environment "
            + url.split("?")[0]
            + " after "
            + format(seconds, "g")
            + " s\n"
        )
        try:
            os.write(2, message.encode())
        finally:
            os._exit(EXIT_STARTUP_TIMEOUT)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def main() -> None:
    url = os.environ.get("ASCEND_ENV_URL")
    digest = os.environ.get("ASCEND_ENV_SHA256", "").lower()
    if not url or len(digest) != 64:
        fail("set ASCEND_ENV_URL and ASCEND_ENV_SHA256 (64 hex digits)")
    cache = os.environ.get("ASCEND_ENV_CACHE") or os.path.join(tempfile.gettempdir(), "ascend-envs")
    watchdog = startup_watchdog(os.environ.get("ASCEND_STARTUP_TIMEOUT"), url)
    try:
        folder = unpacked(url, digest, cache)
    except (OSError, tarfile.TarError) as exc:  # TarError: also entries the filter refuses
        fail("cannot unpack the environment into " + cache + ": " + repr(exc))
    if watchdog is not None:
        watchdog.cancel()
    started = os.environ.get("ASCEND_STARTED_FILE")
    if started:  # what a startup probe waits for: the runner starts now
        try:
            open(started, "w").close()
        except OSError as exc:
            fail("cannot write " + started + ": " + repr(exc))
    import site

    sys.path.insert(0, folder)
    site.addsitedir(folder)  # its .pth files (namespace packages, path hooks)
    # The environment's own copy goes first, ahead of anything addsitedir appended.
    sys.path.remove(folder)
    sys.path.insert(0, folder)
    import runpy

    runpy.run_module("ascend_runner", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
