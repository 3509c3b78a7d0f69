"""A local wheel index for environment builds, made by the tests (no PyPI at test time).

``wheel_index(folder)`` writes a folder usable as uv's ``--find-links``:

- ``ascend_envtest_pkg-1.0-py3-none-any.whl``: a tiny package written here, which no
  test venv has installed (``import ascend_envtest_pkg; ascend_envtest_pkg.VALUE``);
- the runner's own dependencies (cloudpickle, fsspec) repacked as wheels from the test
  venv's installed copies, so an environment resolves to the client's exact versions.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.server
import importlib.metadata
import os
import socket
import stat
import threading
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

TEST_PACKAGE = "ascend-envtest-pkg"
TEST_MODULE = "ascend_envtest_pkg"
TEST_VALUE = "hello from an environment"
RUNNER_DEPS = ("cloudpickle", "fsspec")
_SKIP = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD", "uv_cache.json"}


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_wheel(
    folder: Path,
    name: str,
    version: str,
    files: Mapping[str, bytes],
    *,
    requires: Iterable[str] = (),
    tag: str = "py3-none-any",
    metadata: bytes | None = None,
    purelib: bool = True,
) -> Path:
    """A valid wheel of ``files`` (archive name -> bytes); METADATA generated unless given."""
    stem = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    dist_info = f"{stem}.dist-info"
    if metadata is None:
        text = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        metadata = (text + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode()
    wheel = (
        f"Wheel-Version: 1.0\nGenerator: ascend-tests\n"
        f"Root-Is-Purelib: {str(purelib).lower()}\nTag: {tag}\n"
    )
    entries = {
        **files,
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": wheel.encode(),
    }
    record = [_record_line(n, d) for n, d in sorted(entries.items())]
    record.append(f"{dist_info}/RECORD,,")
    entries[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{stem}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for entry, data in sorted(entries.items()):
            info = zipfile.ZipInfo(entry, (1980, 1, 1, 0, 0, 0))
            executable = ".data/scripts/" in entry
            info.external_attr = (stat.S_IFREG | (0o755 if executable else 0o644)) << 16
            zf.writestr(info, data)
    return path


def _compressed(tags: list[str]) -> str:
    """``py2-none-any`` + ``py3-none-any`` -> ``py2.py3-none-any`` (the filename form)."""
    parts = [t.split("-") for t in tags]
    return "-".join(".".join(sorted({p[i] for p in parts})) for i in range(3))


def repack_installed(dist_name: str, folder: Path) -> Path:
    """A wheel of an installed distribution, from its files on disk (scripts installed
    in ``bin/`` go back to the wheel's ``.data/scripts``; the first tag is kept)."""
    dist = importlib.metadata.distribution(dist_name)
    stem = f"{canonicalize_name(dist.metadata['Name']).replace('-', '_')}-{dist.version}"
    wheel_file = dist.read_text("WHEEL") or ""
    tags = [
        line.split(":", 1)[1].strip() for line in wheel_file.splitlines() if line.startswith("Tag:")
    ]
    purelib = "Root-Is-Purelib: true" in wheel_file
    files: dict[str, bytes] = {}
    metadata = b""
    for item in dist.files or []:
        name = str(item)
        if "__pycache__" in name or name.endswith(".pyc"):
            continue
        if name.startswith(".."):
            if "/bin/" in name:
                data = Path(str(dist.locate_file(item))).read_bytes()
                files[f"{stem}.data/scripts/{name.rsplit('/', 1)[-1]}"] = data
            continue
        base = name.rsplit("/", 1)[-1]
        if ".dist-info/" in name:
            if base == "METADATA":
                metadata = Path(str(dist.locate_file(item))).read_bytes()
            continue
        if base in _SKIP:
            continue
        files[name] = Path(str(dist.locate_file(item))).read_bytes()
    # The real METADATA keeps its Requires-Dist.
    return write_wheel(
        folder,
        dist.metadata["Name"],
        dist.version,
        files,
        metadata=metadata,
        tag=_compressed(tags) if tags else "py3-none-any",
        purelib=purelib,
    )


def repack_with_dependencies(names: Iterable[str], folder: Path) -> list[Path]:
    """Wheels of installed distributions and everything they require (markers evaluated
    for this interpreter, no extras), from the installed copies."""
    from packaging.requirements import Requirement

    todo = list(names)
    seen: set[str] = set()
    out = []
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        dist = importlib.metadata.distribution(name)
        out.append(repack_installed(name, folder))
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return out


def wheel_index(folder: Path, *, with_build_tools: bool = False) -> Path:
    """The find-links folder described in the module docstring; ``with_build_tools``
    adds the installed uv and oras-py (with its dependencies), which build pods install
    with pip (oras-py for pushing an environment image)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = f"VALUE = {TEST_VALUE!r}\n".encode()
    write_wheel(folder, TEST_PACKAGE, "1.0", {f"{TEST_MODULE}/__init__.py": source})
    for dist in RUNNER_DEPS:
        repack_installed(dist, folder)
    if with_build_tools:
        repack_installed("uv", folder)
        repack_with_dependencies(["oras"], folder)
    return folder


@contextlib.contextmanager
def serve(folder: Path, address: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``folder`` over HTTP (a find-links page per directory listing); yields
    its URL. Pods reach the suite's own address, not loopback, on real nodes."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer((address, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{address}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def suite_address(cluster: object) -> str:
    """Where pods can reach a server the suite starts: the test cluster's own address
    (never loopback: pods cannot reach it), else ``$ASCEND_TEST_SUITE_ADDRESS``, else
    loopback (kind and local runs)."""
    inner = getattr(cluster, "cluster", None)
    return (
        getattr(inner, "suite_address", None)
        or os.environ.get("ASCEND_TEST_SUITE_ADDRESS")
        or "127.0.0.1"
    )


class StallingProxy:
    """A TCP proxy in front of the S3 store that passes every connection through,
    except one whose first request GETs an environment archive: that one is accepted and
    never answered (a store that stalls on the large object)."""

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._server = socket.create_server((host, 0))  # pods need the suite's address
        self.url = f"http://{host}:{self._server.getsockname()[1]}"
        self.stalled: list[socket.socket] = []
        self._open: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._open.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: Any) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(65536)
            if not data:
                return
            head += data
        line = head.split(b"\r\n", 1)[0]
        if line.startswith(b"GET ") and b".tar.gz" in line:
            self.stalled.append(client)  # never answered
            return
        upstream = socket.create_connection(self._upstream)
        self._open.append(upstream)
        upstream.sendall(head)

        def pipe(src: Any, dst: Any) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        for s in self._open:
            with contextlib.suppress(OSError):
                s.close()
