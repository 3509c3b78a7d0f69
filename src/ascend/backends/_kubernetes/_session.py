"""Client sessions: a Lease per client that owns its Jobs, and the reaper of expired ones.

Every client process that submits Kubernetes Jobs holds one ``coordination.k8s.io/v1``
Lease per namespace, named ``ascend-session-<user>-<session>``, and renews it every
third of ``session_lease_seconds``. Each Job it submits (unless ``detach=True``) names
that Lease in its ``ownerReferences``. When the client dies without cleaning up
(``kill -9``, a closed laptop), the Lease stops being renewed; any ascend client in the
namespace (at start, then every ``session_reaper_seconds``), ``ascend gc --sessions`` or
the reaper CronJob deletes it once expired, and Kubernetes' garbage collector deletes
the Jobs it owned, and their pods.

Bound: an orphaned Job is deleted within ``session_lease_seconds +
session_reaper_seconds`` (plus the garbage collector's few seconds) while some reaper
runs in its namespace.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
from typing import Any, Final

import anyio

from ascend._config import Settings
from ascend._errors import PermissionDenied
from ascend._logging import logger
from ascend.backends._kubernetes._client import Api, ApiError

log = logger

LABEL_MANAGED: Final = "app.kubernetes.io/managed-by"
LABEL_SESSION: Final = "ascend.dev/session"
LABEL_USER: Final = "ascend.dev/user"
LEASE_PREFIX: Final = "ascend-session-"
_MICRO = "%Y-%m-%dT%H:%M:%S.%fZ"


def leases_path(namespace: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def micro_time(when: dt.datetime) -> str:
    """A Kubernetes ``MicroTime`` (RFC 3339 with microseconds, UTC)."""
    return when.astimezone(dt.UTC).strftime(_MICRO)


def parse_time(text: str) -> dt.datetime:
    """A Kubernetes ``Time`` or ``MicroTime`` as an aware datetime."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def expired(lease: dict[str, Any], now: dt.datetime | None = None) -> bool:
    """Whether an ascend session Lease is past its renew time plus its duration."""
    spec = lease.get("spec") or {}
    stamp = spec.get("renewTime") or spec.get("acquireTime")
    if not stamp:
        stamp = lease.get("metadata", {}).get("creationTimestamp")
    if not stamp:
        return True
    duration = float(spec.get("leaseDurationSeconds") or 0)
    return parse_time(stamp) + dt.timedelta(seconds=duration) < (now or _now())


class Session:
    """This client's Lease in one namespace: created on first use, renewed while alive."""

    def __init__(self, api: Api, namespace: str, settings: Settings, session: str) -> None:
        self.api = api
        self.namespace = namespace
        self.user = settings.user
        self.session = session
        self.duration = settings.session_lease_seconds
        self.reaper_period = settings.session_reaper_seconds
        self.name = f"{LEASE_PREFIX}{settings.user}-{session}"[:253]
        self.uid: str | None = None
        self._lock = anyio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._refused = False
        self._failing = False  # say a failure once, not once per period

    @classmethod
    async def of(
        cls,
        sessions: dict[tuple[Any, ...], Session],
        api: Api,
        namespace: str,
        settings: Settings,
        session: str,
    ) -> dict[str, Any] | None:
        """The owner reference of this client's session for ``settings`` (one Lease per
        namespace, user and lease timing), made on first use and kept in ``sessions``."""
        key = (
            id(api),
            namespace,
            settings.user,
            settings.session_lease_seconds,
            settings.session_reaper_seconds,
        )
        if key not in sessions:
            suffix = session if not sessions else f"{session}-{len(sessions)}"
            sessions[key] = cls(api, namespace, settings, suffix)
        return await sessions[key].owner_reference()

    def _body(self) -> dict[str, Any]:
        now = micro_time(_now())
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "labels": {
                    LABEL_MANAGED: "ascend",
                    LABEL_USER: self.user,
                    LABEL_SESSION: self.session,
                },
            },
            "spec": {
                "holderIdentity": f"{socket.gethostname()}/{os.getpid()}"[:128],
                "leaseDurationSeconds": max(int(self.duration + 0.999), 1),
                "acquireTime": now,
                "renewTime": now,
            },
        }

    async def owner_reference(self) -> dict[str, Any] | None:
        """The ownerReference that ties a Job to this session (the Lease is created on
        first call); None when the Lease cannot be created (no ``leases`` permission):
        the Job then runs unowned, as before, and a warning says so once."""
        async with self._lock:
            if self.uid is None and not self._refused:
                await self._create()
            if self.uid is None:
                return None
            return {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "name": self.name,
                "uid": self.uid,
            }

    async def _create(self) -> None:
        try:
            created = await self.api.request("POST", leases_path(self.namespace), body=self._body())
        except PermissionDenied as exc:
            self._refused = True
            log.warning(
                "no session lease: Jobs of this client will not be cleaned up if it dies",
                namespace=self.namespace,
                error=str(exc),
                fix="grant leases (get, list, create, patch, delete), see docs/kubernetes.md",
            )
            return
        self.uid = created["metadata"]["uid"]
        loop = asyncio.get_running_loop()
        if not self._tasks:
            self._tasks = [loop.create_task(self._renew()), loop.create_task(self._reap())]

    def _failed(self, what: str, exc: Exception) -> None:
        if not self._failing:
            log.warning(f"{what} failed; retrying quietly", lease=self.name, error=str(exc))
        self._failing = True

    async def _renew(self) -> None:
        path = f"{leases_path(self.namespace)}/{self.name}"
        while True:
            await anyio.sleep(max(self.duration / 3, 0.2))
            patch = {"spec": {"renewTime": micro_time(_now())}}
            try:
                await self.api.request(
                    "PATCH", path, body=patch, content_type="application/merge-patch+json"
                )
                self._failing = False
            except ApiError as exc:
                if exc.status == 404:
                    # Reaped while this client was unreachable: its Jobs are gone too.
                    log.warning("session lease was reaped; starting a new one", lease=self.name)
                    async with self._lock:
                        self.uid = None
                        await self._create_again()
                else:
                    self._failed("renewing the session lease", exc)
            except Exception as exc:  # keep renewing through a flaky API server
                self._failed("renewing the session lease", exc)

    async def _create_again(self) -> None:
        try:
            created = await self.api.request("POST", leases_path(self.namespace), body=self._body())
            self.uid = created["metadata"]["uid"]
        except Exception as exc:
            log.warning("recreating the session lease failed", error=str(exc))

    async def _reap(self) -> None:
        while True:
            try:
                await reap_expired(self.api, self.namespace)
            except PermissionDenied:
                return  # said once when the lease was refused
            except Exception as exc:
                self._failed("reaping expired sessions", exc)
            await anyio.sleep(self.reaper_period)


async def reap_expired(api: Api, namespace: str, *, dry_run: bool = False) -> list[str]:
    """Delete the expired ascend session Leases of ``namespace``; the garbage collector
    then deletes the Jobs (and pods) they own. Returns the names of the Leases deleted
    (or that would be, with ``dry_run``)."""
    listing = await api.request(
        "GET", leases_path(namespace), query={"labelSelector": f"{LABEL_MANAGED}=ascend"}
    )
    now = _now()
    reaped: list[str] = []
    for lease in listing.get("items") or []:
        meta = lease["metadata"]
        if not meta["name"].startswith(LEASE_PREFIX) or not expired(lease, now):
            continue
        reaped.append(meta["name"])
        if dry_run:
            continue
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
            # Renewed since it was listed? Then the delete is refused (409): not expired.
            "preconditions": {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]},
        }
        try:
            await api.request("DELETE", f"{leases_path(namespace)}/{meta['name']}", body=body)
            log.info("reaped expired session", lease=meta["name"], namespace=namespace)
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise
            reaped.remove(meta["name"])
    return reaped
