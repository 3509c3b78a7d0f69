"""Slow image pulls on the test cluster: a throttled path to the suite's registry and a
fresh image no node has.

The nodes pull every suite image at start-up, so no call ever waits for a pull. To make
one wait:

- :class:`ThrottlingProxy` listens on the suite's service address (pods and containerd
  reach it; never the machine's external address) and forwards to the registry,
  capping the bytes per second it sends back (all connections share the cap, so
  containerd's parallel layer downloads cannot add up to more);
- :func:`add_mirror` gives every node's containerd a ``certs.d/<proxy>/hosts.toml``
  (plain HTTP). containerd 1.6 reads the hosts folder at each pull, so a folder added
  while the nodes run is used by the next pull;
- :func:`push_slow_image` pushes the suite's runner image plus one layer of random
  bytes (fresh per call: no node's content store can hold it) under a new repository,
  its base layers mounted from the runner image's repository. Only the new layer
  travels: the nodes already hold the others.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tests.cluster import images

REPOSITORY = "ascend-slowpull/runner"
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
_CONFIG = "application/vnd.oci.image.config.v1+json"


class _Throttle:
    """A shared bytes-per-second budget: each chunk reserves its slot in one queue."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = 0.0
        self.sent = 0

    def take(self, size: int) -> None:
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + size / self.rate
            self.sent += size
            until = self._free_at
        time.sleep(max(until - time.monotonic(), 0.0))


class ThrottlingProxy:
    """A TCP proxy to ``upstream`` (``host:port``) whose answers flow at ``rate``
    bytes/s in all (requests pass at full speed). ``url`` is ``host:port``, as
    containerd's hosts folders name a registry. ``close()`` cuts every open connection,
    so a pull still under way fails at once."""

    CHUNK = 16 << 10

    def __init__(self, upstream: str, host: str, rate: float) -> None:
        name, _, port = upstream.rpartition(":")
        self._upstream = (name, int(port))
        self.throttle = _Throttle(rate)
        self._server = socket.create_server((host, 0))
        self.url = f"{host}:{self._server.getsockname()[1]}"
        self._open: list[socket.socket] = [self._server]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            self._open += [client, upstream]
            if self._closed:  # close() ran while this connection was being made
                self.close()
                return
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(upstream, client, self.throttle), daemon=True
            ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, throttle: _Throttle | None) -> None:
        try:
            while data := src.recv(self.CHUNK):
                if throttle is not None:
                    throttle.take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    @property
    def sent(self) -> int:
        """Bytes sent back so far (throttled)."""
        return self.throttle.sent

    def close(self) -> None:
        self._closed = True
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> ThrottlingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_mirror(nodes: Iterable[Any], host: str) -> list[Path]:
    """Let each node's containerd pull from ``host`` (``host:port``) over plain HTTP;
    returns the folders written (give them to :func:`remove_mirror`)."""
    from tests.cluster.nodes import write_mirror

    return [write_mirror(Path(node.root), host, host) for node in nodes]


def remove_mirror(folders: Iterable[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def throttled_registry(cluster: Any, rate: float) -> Iterator[ThrottlingProxy]:
    """A :class:`ThrottlingProxy` to ``cluster``'s registry on the suite's address,
    known to every node's containerd for as long as the block runs."""
    assert cluster.registry is not None, "the cluster's registry is not running"
    with ThrottlingProxy(cluster.registry.url, cluster.suite_address, rate) as proxy:
        folders = add_mirror(cluster.nodes.values(), proxy.url)
        try:
            yield proxy
        finally:
            remove_mirror(folders)


def _random_layer(size: int) -> tuple[bytes, str]:
    """A ``tar+gzip`` layer holding ``size`` random bytes (incompressible: the blob is
    as large as that) in ``/opt/slowpull/<random name>``; returns it and its diff_id."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"opt/slowpull/{uuid.uuid4().hex}.bin")
        info.size = size
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), _digest(tar_bytes)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _get(url: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return bytes(response.read())


def push_slow_image(registry: str, extra_bytes: int, *, base: str | None = None) -> str:
    """Push ``base`` (the suite's runner image by default) plus a fresh layer of
    ``extra_bytes`` random bytes to ``registry`` (``host:port``, plain HTTP) as
    ``REPOSITORY:<unique tag>``; returns ``<repository>:<tag>`` (prefix it with the host
    to pull from)."""
    from ascend.backends._kubernetes._spec import default_image

    source, tag = images._repository(base or default_image())
    manifest = json.loads(_get(f"http://{registry}/v2/{source}/manifests/{tag}", _MANIFEST))
    config = json.loads(_get(f"http://{registry}/v2/{source}/blobs/{manifest['config']['digest']}"))
    for layer in manifest["layers"]:  # no bytes move: the registry links them
        status, _ = images._request(
            "POST",
            f"http://{registry}/v2/{REPOSITORY}/blobs/uploads/"
            f"?mount={layer['digest']}&from={source}",
            b"",
        )
        assert status == 201, f"mounting {layer['digest']} from {source} answered {status}"
    blob, diff_id = _random_layer(extra_bytes)
    digest = _digest(blob)
    images._push_blob(registry, REPOSITORY, digest, lambda: blob, len(blob))
    config["rootfs"]["diff_ids"].append(diff_id)
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = _digest(config_bytes)
    images._push_blob(registry, REPOSITORY, config_digest, lambda: config_bytes, len(config_bytes))
    manifest = {
        "schemaVersion": 2,
        "mediaType": _MANIFEST,
        "config": {"mediaType": _CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [
            *manifest["layers"],
            {"mediaType": _LAYER, "digest": digest, "size": len(blob)},
        ],
    }
    new_tag = f"slow-{uuid.uuid4().hex[:12]}"
    images._request(
        "PUT",
        f"http://{registry}/v2/{REPOSITORY}/manifests/{new_tag}",
        json.dumps(manifest).encode(),
        {"Content-Type": _MANIFEST},
    )
    return f"{REPOSITORY}:{new_tag}"
