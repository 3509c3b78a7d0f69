"""Shared list+watch loops: one per resource kind and namespace, for every future.

Each loop lists, then watches from the list's resourceVersion with bookmarks; it
resumes from the last resourceVersion when a watch ends or breaks, re-lists on
``410 Gone``, notices a silent connection by its read timeout, and backs off with
jitter on errors. Events go to the subscriber registered for the object's job-id
label; the latest object per job is cached so a late subscriber (re-attach) catches up.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import anyio

from ascend._logging import logger
from ascend.backends._kubernetes._client import (
    WATCH_READ_TIMEOUT,
    WATCH_SERVER_TIMEOUT,
    Api,
    ApiError,
)
from ascend.backends._kubernetes._spec import LABEL_JOB_ID

log = logger

Handler = Callable[[str, dict[str, Any]], None]
KeyFunction = Callable[[dict[str, Any]], str | None]


def job_id_label(obj: dict[str, Any]) -> str | None:
    """Jobs and pods: the job id is a label."""
    value = (obj.get("metadata", {}).get("labels") or {}).get(LABEL_JOB_ID)
    return str(value) if value else None


def involved_job(obj: dict[str, Any]) -> str | None:
    """Events: the Job they are about (its name is the job id)."""
    involved = obj.get("involvedObject") or {}
    return str(involved["name"]) if involved.get("kind") == "Job" and involved.get("name") else None


class Informer:
    """Lists and watches one collection, dispatching events by job id."""

    def __init__(
        self,
        api: Api,
        path: str,
        kind: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        key: KeyFunction = job_id_label,
    ) -> None:
        self._api = api
        self._path = path
        self._query = {
            name: value
            for name, value in (
                ("labelSelector", label_selector),
                ("fieldSelector", field_selector),
            )
            if value
        }
        self._key = key
        self.kind = kind
        self._subscribers: dict[str, Handler] = {}
        self._cache: dict[str, dict[str, dict[str, Any]]] = defaultdict(
            dict
        )  # job id -> name -> obj
        self._synced = anyio.Event()
        self.resource_version: str | None = None
        self.watches_opened = 0
        self.relists = 0

    def subscribe(self, job_id: str, handler: Handler) -> None:
        self._subscribers[job_id] = handler
        for obj in list(self._cache.get(job_id, {}).values()):
            handler("ADDED", obj)

    def unsubscribe(self, job_id: str) -> None:
        self._subscribers.pop(job_id, None)

    def cached(self, job_id: str) -> list[dict[str, Any]]:
        return list(self._cache.get(job_id, {}).values())

    async def wait_synced(self) -> None:
        await self._synced.wait()

    def _dispatch(self, kind: str, obj: dict[str, Any]) -> None:
        job_id = self._key(obj)
        if not job_id:
            return
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self._cache[job_id].pop(name, None)
            if not self._cache[job_id]:
                del self._cache[job_id]
        else:
            self._cache[job_id][name] = obj
        handler = self._subscribers.get(job_id)
        if handler is not None:
            try:
                handler(kind, obj)
            except Exception:  # one broken subscriber must not stop the shared watch
                log.exception("watch handler failed", kind=self.kind, job=job_id)

    async def _list(self) -> None:
        listing = await self._api.request("GET", self._path, query=self._query)
        self.relists += 1
        seen: set[tuple[str, str]] = set()
        for obj in listing.get("items") or []:
            seen.add((self._key(obj) or "", obj["metadata"]["name"]))
            self._dispatch("ADDED", obj)
        # Objects deleted while we were not watching.
        for job_id, objects in list(self._cache.items()):
            for name, obj in list(objects.items()):
                if (job_id, name) not in seen:
                    self._dispatch("DELETED", obj)
        self.resource_version = listing["metadata"]["resourceVersion"]
        self._synced.set()

    async def _watch(self) -> None:
        query = {
            **self._query,
            "watch": True,
            "allowWatchBookmarks": True,
            "resourceVersion": self.resource_version,
            "timeoutSeconds": WATCH_SERVER_TIMEOUT,
        }
        self.watches_opened += 1
        async for line in self._api.stream_lines(
            self._path, query, read_timeout=WATCH_READ_TIMEOUT
        ):
            if not line.strip():
                continue
            event = json.loads(line)
            obj = event.get("object") or {}
            kind = event.get("type")
            if kind == "ERROR":
                if obj.get("code") == 410:
                    self.resource_version = None  # too old: list again
                    return
                raise ApiError(int(obj.get("code") or 500), str(obj.get("message")))
            version = obj.get("metadata", {}).get("resourceVersion")
            if version:
                self.resource_version = version
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._dispatch(kind, obj)

    async def run(self) -> None:
        """Forever: list when needed, watch, resume; errors back off with jitter."""
        failures = 0
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
                failures = 0
            except ApiError as exc:
                if exc.status == 410:
                    self.resource_version = None
                failures += 1
                log.debug("watch restarting", kind=self.kind, error=str(exc))
            except (OSError, TimeoutError, ValueError, Exception) as exc:
                failures += 1
                log.debug("watch restarting", kind=self.kind, error=repr(exc))
            if failures:
                await anyio.sleep(min(0.2 * 2 ** min(failures, 6), 10) * random.uniform(0.5, 1.5))
