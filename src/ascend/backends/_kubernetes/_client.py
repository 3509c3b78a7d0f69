"""Talking to the Kubernetes API: configuration, raw-JSON requests, a write rate limit."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from ascend._config import Settings
from ascend._errors import AscendError, ConfigError, PermissionDenied

# Every request carries a timeout; a watch's read timeout is its server timeout plus slack,
# so a connection that silently stops delivering is noticed.
REQUEST_TIMEOUT = 30.0
WATCH_SERVER_TIMEOUT = 240
WATCH_READ_TIMEOUT = WATCH_SERVER_TIMEOUT + 30
POOL_SIZE = 64


class ApiError(AscendError):
    """An unexpected answer from the Kubernetes API."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _load_configuration(kubeconfig: str | None, context: str | None) -> Any:
    """kubeconfig argument > $KUBECONFIG (read now) > ~/.kube/config > in-cluster."""
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    first = path.split(os.pathsep)[0]
    if kubeconfig or Path(first).exists():
        if not Path(first).exists():
            raise ConfigError(
                f"kubeconfig {first} does not exist. Fix: pass kubeconfig=... or set KUBECONFIG."
            )
        asyncio.run(
            config.load_kube_config(first, context=context, client_configuration=configuration)
        )
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        raise ConfigError(
            "no Kubernetes configuration found: no kubeconfig argument, no $KUBECONFIG, no "
            "~/.kube/config and not running in a cluster. Fix: ascend.configure(kubeconfig=...) "
            "or set KUBECONFIG."
        )
    configuration.connection_pool_maxsize = POOL_SIZE
    return configuration


class TokenBucket:
    """Client-side rate limit for writes (the Python clients have none of their own)."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._lock = anyio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            if self._tokens < 1:
                await anyio.sleep((1 - self._tokens) / self._rate)
                self._tokens = 1
                self._stamp = time.monotonic()
            self._tokens -= 1


class Api:
    """Raw-JSON access to the API server through kubernetes_asyncio's authenticated client.

    Typed model deserialisation costs ten times more than the JSON it comes from, so hot
    paths (watch events, status) stay as dicts.
    """

    def __init__(self, api_client: Any, *, writes_per_second: float = 20, burst: int = 40) -> None:
        self._client = api_client
        self.writes = TokenBucket(writes_per_second, burst)
        self.requests = 0

    @classmethod
    async def connect(cls, settings: Settings) -> Api:
        from kubernetes_asyncio import client

        configuration = await anyio.to_thread.run_sync(
            _load_configuration, settings.kubeconfig, settings.context
        )
        rate = settings.kubernetes_writes_per_second
        return cls(
            client.ApiClient(configuration), writes_per_second=rate, burst=max(int(2 * rate), 1)
        )

    async def close(self) -> None:
        await self._client.close()

    async def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None,
        body: Any,
        deadline: Any,
        content_type: str = "application/json",
    ) -> Any:
        self.requests += 1
        return await self._client.call_api(
            path,
            method,
            query_params=[
                (k, str(v).lower() if isinstance(v, bool) else str(v))
                for k, v in (query or {}).items()
            ],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _preload_content=False,
            _request_timeout=deadline,
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """One request; returns the decoded JSON. Raises ApiError / PermissionDenied."""
        if method != "GET":
            await self.writes.acquire()
        response = await self._send(method, path, query, body, REQUEST_TIMEOUT, content_type)
        try:
            raw = await response.read()
        finally:
            response.release()
        if response.status >= 400:
            raise _error(response.status, raw, method, path)
        return json.loads(raw) if raw else None

    def stream_lines(
        self, path: str, query: Mapping[str, Any], *, read_timeout: float
    ) -> AsyncIterator[bytes]:
        """A long-running GET (watch, log follow), line by line."""
        return self._stream(path, query, read_timeout, lines=True)

    def stream_chunks(
        self, path: str, query: Mapping[str, Any], *, read_timeout: float
    ) -> AsyncIterator[bytes]:
        """A long-running GET (log follow), in pieces as they arrive: no line-length limit."""
        return self._stream(path, query, read_timeout, lines=False)

    async def _stream(
        self, path: str, query: Mapping[str, Any], read_timeout: float, *, lines: bool
    ) -> AsyncIterator[bytes]:
        """One long-running GET: no total timeout, ``read_timeout`` seconds of silence
        at most; the response is released when the iteration ends or is closed."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=REQUEST_TIMEOUT, sock_read=read_timeout
        )
        response = await self._send("GET", path, query, None, timeout)
        try:
            if response.status >= 400:
                raise _error(response.status, await response.read(), "GET", path)
            pieces = response.content if lines else response.content.iter_any()
            async for piece in pieces:
                yield piece
        finally:
            response.release()


def _error(status: int, raw: bytes, method: str, path: str) -> AscendError:
    try:
        message = json.loads(raw).get("message", "")
    except ValueError:
        message = raw.decode(errors="replace")[:500]
    if status in (401, 403):
        return PermissionDenied(
            f"Kubernetes refused {method} {path}: {message}. Fix: ask a cluster admin for a Role "
            "in this namespace allowing jobs (create, get, list, watch, delete), pods and "
            "pods/log (get, list, watch), events (list), secrets (get, create) and leases "
            "(get, list, create, patch, delete) — "
            "`ascend` docs/kubernetes.md has the manifest — or use your own namespace "
            "(namespace=... / ASCEND_NAMESPACE)."
        )
    return ApiError(status, f"Kubernetes answered {status} to {method} {path}: {message}")
