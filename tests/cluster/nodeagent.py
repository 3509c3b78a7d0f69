"""A node agent: plays the kubelet for one Node, running each pod's container as a local
process.

It registers the Node (capacity, labels, taints, Ready), renews its Lease, watches the
pods bound to it, runs each container's ``command``/``args`` with its environment
(Secrets, ConfigMaps and field references resolved), reports phases and container states
as the kubelet would (``OOMKilled`` when the process tree exceeds its memory limit,
``DeadlineExceeded`` past ``activeDeadlineSeconds``, ``ErrImagePull`` for an unknown
image), finalises deletions, and serves the kubelet's ``containerLogs`` endpoint so
``kubectl logs -f`` and the apiserver's ``pods/log`` work.

Run: ``python -m tests.cluster.nodeagent --kubeconfig K --name N --cpu 4 --memory 8Gi
[--gpus 2] [--instance-type T] [--taint k=v:Effect] [--log-dir D] [--image-map GLOB=PREFIX]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import fnmatch
import json
import os
import signal
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

LEASE_SECONDS = 10
RENEW_EVERY = 3.0
MEMORY_POLL = 0.1
WATCH_TIMEOUT = 60
DEFAULT_IMAGE_MAP = ("*ascend-k8s-runner*", "*ascend-runner*", "python:*", "python")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


CRI_MAX_LINE = 16384  # containerd's default max_container_log_line_size


def now_nano() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def quantity_bytes(value: str) -> int:
    units = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(float(value))


@dataclass
class Client:
    """Just enough of the Kubernetes REST API, with raw JSON."""

    server: str
    session: aiohttp.ClientSession

    @classmethod
    def from_kubeconfig(cls, path: str) -> Client:
        config = json.loads(Path(path).read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        context = ssl.create_default_context(cafile=cluster["certificate-authority"])
        headers = {}
        if "client-certificate" in user:
            context.load_cert_chain(user["client-certificate"], user["client-key"])
        if "token" in user:
            headers["Authorization"] = f"Bearer {user['token']}"
        connector = aiohttp.TCPConnector(ssl=context, limit=50)
        session = aiohttp.ClientSession(connector=connector, headers=headers)
        return cls(cluster["server"], session)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        ok404: bool = False,
        **params: Any,
    ) -> Any:
        data = json.dumps(body) if body is not None else None
        async with self.session.request(
            method,
            self.server + path,
            data=data,
            params={k: str(v) for k, v in params.items()},
            headers={"Content-Type": content_type},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            text = await response.text()
            if response.status == 404 and ok404:
                return None
            if response.status >= 400:
                raise ApiError(response.status, f"{method} {path}: {response.status} {text[:500]}")
            return json.loads(text) if text else None

    async def patch_status(self, path: str, status: dict[str, Any]) -> Any:
        return await self.request(
            "PATCH",
            f"{path}/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )

    async def watch(
        self, path: str, resource_version: str, **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        query = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT),
            **params,
        }
        async with self.session.get(
            self.server + path,
            params=query,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=WATCH_TIMEOUT + 15),
        ) as response:
            if response.status >= 400:
                raise ApiError(response.status, await response.text())
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Container:
    """One running (or finished) container: its process and its log."""

    pod_key: str
    log_path: Path
    started_at: str = ""
    process: asyncio.subprocess.Process | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    new_line: asyncio.Condition = field(default_factory=asyncio.Condition)
    kill_reason: str | None = None


class NodeAgent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.name: str = args.name
        self.args = args
        self.client = Client.from_kubeconfig(args.kubeconfig)
        self.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix=f"node-{self.name}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.image_map = [tuple(item.split("=", 1)) for item in args.image_map] + [
            (p, sys.prefix) for p in DEFAULT_IMAGE_MAP
        ]
        self.containers: dict[str, Container] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.port = 0
        self.stopping = asyncio.Event()

    # -- registration --------------------------------------------------------------

    def node_status(self) -> dict[str, Any]:
        capacity = {
            "cpu": self.args.cpu,
            "memory": self.args.memory,
            "pods": "110",
            "ephemeral-storage": "100Gi",
        }
        if self.args.gpus:
            capacity["nvidia.com/gpu"] = str(self.args.gpus)
        stamp = now()
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "node agent is ready",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                },
                *(
                    {
                        "type": t,
                        "status": "False",
                        "reason": f"KubeletHas{r}",
                        "lastHeartbeatTime": stamp,
                        "lastTransitionTime": stamp,
                    }
                    for t, r in (
                        ("MemoryPressure", "SufficientMemory"),
                        ("DiskPressure", "NoDiskPressure"),
                        ("PIDPressure", "SufficientPID"),
                    )
                ),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "nodeInfo": {
                "machineID": self.name,
                "systemUUID": self.name,
                "bootID": str(os.getpid()),
                "kernelVersion": os.uname().release,
                "osImage": "ascend test node agent",
                "containerRuntimeVersion": "process://1",
                "kubeletVersion": "v1.36.3",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    async def register(self) -> None:
        taints = []
        for spec in self.args.taint:
            key_value, effect = spec.rsplit(":", 1)
            key, _, value = key_value.partition("=")
            taints.append({"key": key, "value": value, "effect": effect})
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node.kubernetes.io/instance-type": self.args.instance_type,
                },
            },
            "spec": {"taints": taints},
        }
        existing = await self.client.request("GET", f"/api/v1/nodes/{self.name}", ok404=True)
        if existing is None:
            await self.client.request("POST", "/api/v1/nodes", node)
        else:
            # A restarted agent: keep the Node (its pods stay bound) but reset labels/taints.
            patch = {"metadata": {"labels": node["metadata"]["labels"]}, "spec": {"taints": taints}}
            await self.client.request(
                "PATCH",
                f"/api/v1/nodes/{self.name}",
                patch,
                content_type="application/merge-patch+json",
            )
        await self.client.patch_status(f"/api/v1/nodes/{self.name}", self.node_status())

    async def heartbeat(self) -> None:
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        while not self.stopping.is_set():
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": "kube-node-lease"},
                "spec": {
                    "holderIdentity": self.name,
                    "leaseDurationSeconds": LEASE_SECONDS,
                    "renewTime": now_nano(),
                },
            }
            try:
                current = await self.client.request("GET", lease_path, ok404=True)
                if current is None:
                    await self.client.request(
                        "POST",
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                        lease,
                    )
                else:
                    lease["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    await self.client.request("PUT", lease_path, lease)
                await self.client.patch_status(f"/api/v1/nodes/{self.name}", self.node_status())
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                log(f"heartbeat failed: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), RENEW_EVERY)

    # -- pods ------------------------------------------------------------------------

    async def watch_pods(self) -> None:
        selector = {"fieldSelector": f"spec.nodeName={self.name}"}
        first = True
        while not self.stopping.is_set():
            try:
                listing = await self.client.request("GET", "/api/v1/pods", **selector)
                for pod in listing["items"]:
                    self.on_pod(pod, adopt=first)
                first = False
                version = listing["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    async for event in self.client.watch("/api/v1/pods", version, **selector):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise ApiError(obj.get("code", 500), obj.get("message", "watch error"))
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self.on_pod(obj, adopt=False)
            except (ApiError, aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
                log(f"pod watch restarting: {exc}")
                await asyncio.sleep(0.5)

    def on_pod(self, pod: dict[str, Any], *, adopt: bool) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self.tasks and not self.tasks[uid].done():
            if pod["metadata"].get("deletionTimestamp"):
                container = self.containers.get(uid)
                if container is not None and container.kill_reason is None:
                    container.kill_reason = "Deleted"
                    asyncio.get_running_loop().create_task(self.kill(container, pod))
            return
        if uid in self.tasks:  # already handled and finished
            if pod["metadata"].get("deletionTimestamp"):
                self.tasks[uid] = asyncio.get_running_loop().create_task(self.finalize(pod))
            return
        task = asyncio.get_running_loop().create_task(self.run_pod(pod, adopt=adopt))
        task.add_done_callback(_log_failure)
        self.tasks[uid] = task

    def pod_path(self, pod: dict[str, Any]) -> str:
        return f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}"

    async def finalize(self, pod: dict[str, Any]) -> None:
        """Confirm a deletion, as the kubelet does once the containers are gone."""
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": pod["metadata"]["uid"]},
        }
        with contextlib.suppress(ApiError):
            await self.client.request("DELETE", self.pod_path(pod), body, ok404=True)

    def resolve_image(self, image: str) -> str | None:
        for pattern, prefix in self.image_map:
            if fnmatch.fnmatch(image, pattern):
                return prefix
        return None

    async def resolve_env(
        self, pod: dict[str, Any], spec: dict[str, Any], prefix: str
    ) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env = {
            "PATH": f"{prefix}/bin:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "HOSTNAME": pod["metadata"]["name"],
        }
        cache: dict[tuple[str, str], dict[str, str]] = {}

        async def source(kind: str, name: str) -> dict[str, str]:
            if (kind, name) not in cache:
                plural = "secrets" if kind == "secret" else "configmaps"
                obj = await self.client.request(
                    "GET", f"/api/v1/namespaces/{namespace}/{plural}/{name}", ok404=True
                )
                if obj is None:
                    raise LookupError(f'{kind} "{name}" not found')
                data = obj.get("data") or {}
                if kind == "secret":
                    data = {k: base64.b64decode(v).decode() for k, v in data.items()}
                cache[(kind, name)] = data
            return cache[(kind, name)]

        for item in spec.get("envFrom") or []:
            for kind, key in (("secret", "secretRef"), ("configmap", "configMapRef")):
                if key in item:
                    env.update(
                        {
                            item.get("prefix", "") + k: v
                            for k, v in (await source(kind, item[key]["name"])).items()
                        }
                    )
        for var in spec.get("env") or []:
            if "value" in var:
                env[var["name"]] = var["value"]
                continue
            ref = var.get("valueFrom", {})
            if "secretKeyRef" in ref or "configMapKeyRef" in ref:
                kind = "secret" if "secretKeyRef" in ref else "configmap"
                sel = ref["secretKeyRef" if kind == "secret" else "configMapKeyRef"]
                data = await source(kind, sel["name"])
                if sel["key"] not in data:
                    raise LookupError(
                        f"couldn't find key {sel['key']} in {kind} {namespace}/{sel['name']}"
                    )
                env[var["name"]] = data[sel["key"]]
            elif "fieldRef" in ref:
                env[var["name"]] = field_value(pod, ref["fieldRef"]["fieldPath"], self.name)
            else:
                env[var["name"]] = ""
        return env

    async def set_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        """Report a pod's status; like the kubelet's status manager, keep trying through
        a busy or restarting API server until it is reported or the pod is gone."""
        delay = 0.2
        while not self.stopping.is_set():
            try:
                await self.client.patch_status(self.pod_path(pod), status)
                return
            except ApiError as exc:
                if exc.status < 500 and exc.status != 429:
                    if exc.status != 404:  # 404: the pod is gone
                        log(f"status of pod {pod['metadata']['name']} refused: {exc}")
                    return
                problem: BaseException = exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = exc
            log(f"status of pod {pod['metadata']['name']} not reported ({problem!r}); retrying")
            await asyncio.sleep(delay)
            delay = min(2 * delay, 5.0)

    def base_status(
        self,
        pod: dict[str, Any],
        phase: str,
        container_state: dict[str, Any],
        *,
        ready: bool,
        restart_count: int = 0,
    ) -> dict[str, Any]:
        spec = pod["spec"]["containers"][0]
        stamp = now()
        start = pod.get("status", {}).get("startTime") or stamp

        def condition(kind: str, value: bool) -> dict[str, Any]:
            return {
                "type": kind,
                "status": "True" if value else "False",
                "lastTransitionTime": stamp,
            }

        return {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": start,
            "conditions": [
                condition(
                    "PodReadyToStartContainers",
                    "running" in container_state or "terminated" in container_state,
                ),
                condition("Initialized", True),
                condition("Ready", ready),
                condition("ContainersReady", ready),
                condition("PodScheduled", True),
            ],
            "containerStatuses": [
                {
                    "name": spec["name"],
                    "image": spec["image"],
                    "imageID": f"process://{spec['image']}",
                    "containerID": f"process://{pod['metadata']['uid']}",
                    "ready": ready,
                    "started": "running" in container_state,
                    "restartCount": restart_count,
                    "state": container_state,
                }
            ],
        }

    async def run_pod(self, pod: dict[str, Any], *, adopt: bool) -> None:
        uid = pod["metadata"]["uid"]
        phase = pod.get("status", {}).get("phase", "Pending")
        if phase in ("Succeeded", "Failed"):
            if pod["metadata"].get("deletionTimestamp"):
                await self.finalize(pod)
            return
        statuses = pod.get("status", {}).get("containerStatuses") or []
        if pod["metadata"].get("deletionTimestamp"):
            if statuses and "running" in statuses[0].get("state", {}):
                # Its process is gone (this agent restarted): report it dead, then
                # confirm the deletion, so the Job controller sees a terminal pod.
                stamp = now()
                started = statuses[0]["state"]["running"].get("startedAt", stamp)
                state = {
                    "terminated": {
                        "exitCode": 137,
                        "reason": "Error",
                        "startedAt": started,
                        "finishedAt": stamp,
                    }
                }
                await self.set_status(pod, self.base_status(pod, "Failed", state, ready=False))
            await self.finalize(pod)
            return
        if adopt and statuses and "running" in statuses[0].get("state", {}):
            # This agent restarted: the process it ran is gone with the old agent.
            stamp = now()
            state = {
                "terminated": {
                    "exitCode": 137,
                    "reason": "Error",
                    "message": "the node agent restarted; the container's process was lost",
                    "startedAt": statuses[0]["state"]["running"].get("startedAt", stamp),
                    "finishedAt": stamp,
                }
            }
            await self.set_status(pod, self.base_status(pod, "Failed", state, ready=False))
            return
        spec = pod["spec"]["containers"][0]
        prefix = self.resolve_image(spec["image"])
        if prefix is None:
            await self.image_pull_failure(pod, spec["image"])
            return
        try:
            env = await self.resolve_env(pod, spec, prefix)
        except LookupError as exc:
            state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            await self.set_status(pod, self.base_status(pod, "Pending", state, ready=False))
            return
        container = Container(
            uid,
            self.log_dir / f"{pod['metadata']['namespace']}_{pod['metadata']['name']}_{uid}.log",
        )
        self.containers[uid] = container
        await self.start_container(pod, spec, env, container)

    async def image_pull_failure(self, pod: dict[str, Any], image: str) -> None:
        message = f'Failed to pull image "{image}": image is not known to this node (no image map entry matches)'
        await self.set_status(
            pod,
            self.base_status(
                pod,
                "Pending",
                {"waiting": {"reason": "ErrImagePull", "message": message}},
                ready=False,
            ),
        )
        await asyncio.sleep(1)
        backoff = f'Back-off pulling image "{image}": ErrImagePull: {message}'
        await self.set_status(
            pod,
            self.base_status(
                pod,
                "Pending",
                {"waiting": {"reason": "ImagePullBackOff", "message": backoff}},
                ready=False,
            ),
        )

    async def start_container(
        self, pod: dict[str, Any], spec: dict[str, Any], env: dict[str, str], container: Container
    ) -> None:
        argv = [*(spec.get("command") or []), *(spec.get("args") or [])]
        if not argv:
            argv = ["python"]
        workdir = spec.get("workingDir") or tempfile.mkdtemp(prefix="pod-", dir=self.log_dir)
        container.log_path.touch()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=workdir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            stamp = now()
            state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": str(exc),
                    "startedAt": stamp,
                    "finishedAt": stamp,
                }
            }
            await self.set_status(pod, self.base_status(pod, "Failed", state, ready=False))
            container.finished.set()
            return
        container.process = process
        container.started_at = now()
        await self.set_status(
            pod,
            self.base_status(
                pod, "Running", {"running": {"startedAt": container.started_at}}, ready=True
            ),
        )
        limit = (spec.get("resources") or {}).get("limits", {}).get("memory")
        deadline = pod["spec"].get("activeDeadlineSeconds")
        watchers = [
            asyncio.create_task(self.pump(process.stdout, "stdout", container)),
            asyncio.create_task(self.pump(process.stderr, "stderr", container)),
        ]
        if limit:
            watchers.append(
                asyncio.create_task(self.enforce_memory(container, quantity_bytes(limit)))
            )
        if deadline:
            watchers.append(
                asyncio.create_task(self.enforce_deadline(container, pod, float(deadline)))
            )
        code = await process.wait()
        await asyncio.gather(*watchers[:2], return_exceptions=True)
        for task in watchers[2:]:
            task.cancel()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        exit_code = code if code >= 0 else 128 - code
        reason = {"OOMKilled": "OOMKilled"}.get(
            container.kill_reason or "", "Completed" if exit_code == 0 else "Error"
        )
        tail = container.log_path.read_text(errors="replace")[-1024:] if exit_code else ""
        terminated = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": container.started_at,
            "finishedAt": now(),
        }
        if tail:
            terminated["message"] = "".join(
                line.split(" ", 3)[-1] + "\n" for line in tail.splitlines()[-10:]
            )[-1024:]
        status = self.base_status(
            pod,
            "Succeeded" if exit_code == 0 and not container.kill_reason else "Failed",
            {"terminated": terminated},
            ready=False,
        )
        if container.kill_reason == "DeadlineExceeded":
            status.update(
                reason="DeadlineExceeded",
                message="Pod was active on the node longer than the specified deadline",
            )
        async with container.new_line:
            container.finished.set()
            container.new_line.notify_all()
        await self.set_status(pod, status)
        if container.kill_reason == "Deleted":
            await self.finalize(pod)

    async def pump(
        self, stream: asyncio.StreamReader | None, name: str, container: Container
    ) -> None:
        """Write the stream to the CRI log file as containerd does: one record per line,
        a line longer than ``CRI_MAX_LINE`` bytes (or cut off by the end of the output)
        as partial ``P`` records followed by a full ``F`` one; bytes kept as printed."""
        if stream is None:
            return
        pending = b""
        with container.log_path.open("ab") as log_file:
            while True:
                chunk = await stream.read(65536)
                pending += chunk
                lines = pending.split(b"\n")
                pending = b"" if not chunk else lines.pop()
                records: list[tuple[bytes, bytes]] = []
                for line in lines:  # ``chunk`` empty: the last line had no newline
                    for start in range(0, max(len(line), 1), CRI_MAX_LINE):
                        whole = chunk and start + CRI_MAX_LINE >= len(line)
                        records.append(
                            (line[start : start + CRI_MAX_LINE], b"F" if whole else b"P")
                        )
                while len(pending) >= CRI_MAX_LINE:
                    records.append((pending[:CRI_MAX_LINE], b"P"))
                    pending = pending[CRI_MAX_LINE:]
                for content, tag in records:
                    if not content and tag == b"P":
                        continue
                    # One write per record: stdout's and stderr's records never mix.
                    log_file.write(
                        b"%s %s %s %s\n" % (now_nano().encode(), name.encode(), tag, content)
                    )
                log_file.flush()
                async with container.new_line:
                    container.new_line.notify_all()
                if not chunk:
                    return

    async def enforce_memory(self, container: Container, limit: int) -> None:
        assert container.process is not None
        try:
            root = psutil.Process(container.process.pid)
        except psutil.NoSuchProcess:
            return
        while True:
            await asyncio.sleep(MEMORY_POLL)
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.NoSuchProcess:
                continue
            if rss > limit:
                container.kill_reason = "OOMKilled"
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(container.process.pid, signal.SIGKILL)
                return

    async def enforce_deadline(
        self, container: Container, pod: dict[str, Any], seconds: float
    ) -> None:
        start = pod.get("status", {}).get("startTime")
        elapsed = (
            (datetime.datetime.now(datetime.UTC) - parse_time(start)).total_seconds()
            if start
            else 0.0
        )
        await asyncio.sleep(max(seconds - elapsed, 0))
        assert container.process is not None
        container.kill_reason = "DeadlineExceeded"
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(container.process.pid, signal.SIGKILL)

    async def kill(self, container: Container, pod: dict[str, Any]) -> None:
        process = container.process
        if process is None or process.returncode is not None:
            await self.finalize(pod)
            return
        grace = min(int(pod["metadata"].get("deletionGracePeriodSeconds") or 0), 5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(container.finished.wait(), grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    # -- logs endpoint ---------------------------------------------------------------

    async def container_logs(self, request: web.Request) -> web.StreamResponse:
        namespace, pod_name = request.match_info["namespace"], request.match_info["pod"]
        matches = sorted(
            self.log_dir.glob(f"{namespace}_{pod_name}_*.log"), key=lambda p: p.stat().st_mtime
        )
        if not matches:
            return web.Response(status=404, text=f"no logs for {namespace}/{pod_name}")
        path = matches[-1]
        uid = path.stem.rsplit("_", 1)[-1]
        container = self.containers.get(uid)
        query = request.query
        follow = query.get("follow") in ("true", "1")
        timestamps = query.get("timestamps") in ("true", "1")
        since: datetime.datetime | None = None
        if "sinceTime" in query:
            since = parse_time(query["sinceTime"])
        elif "sinceSeconds" in query:
            since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(
                seconds=int(query["sinceSeconds"])
            )
        tail = int(query["tailLines"]) if "tailLines" in query else None
        limit = int(query["limitBytes"]) if "limitBytes" in query else None
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        sent = 0

        # As the kubelet: partial (P) records continue the line they started, which gets
        # one timestamp; a full (F) record ends it with a newline.
        at_line_start, skipping = True, False

        def render(record: bytes) -> bytes | None:
            nonlocal at_line_start, skipping
            parts = record.split(b" ", 3)
            if len(parts) < 4:
                return None
            stamp, _, tag, content = parts
            starts = at_line_start
            if starts:
                skipping = since is not None and parse_time(stamp.decode()) < since
            at_line_start = tag != b"P"
            if skipping:
                return None
            prefix = stamp + b" " if timestamps and starts else b""
            return prefix + content + (b"" if tag == b"P" else b"\n")

        position = 0
        first = True
        while True:
            with path.open("rb") as f:
                f.seek(position)
                chunk = f.read()
                position = f.tell()
            records = chunk.split(b"\n")
            position -= len(records[-1])  # a record still being written: read it next time
            records = [r for r in records[:-1] if r]
            if first and tail is not None:
                records = records[-tail:] if tail else []
            first = False
            for record in records:
                data = render(record)
                if data is None:
                    continue
                if limit is not None and sent + len(data) > limit:
                    data = data[: limit - sent]
                await response.write(data)
                sent += len(data)
                if limit is not None and sent >= limit:
                    return response
            if not follow or container is None or container.finished.is_set():
                if follow and container is not None and records:
                    continue
                break
            async with container.new_line:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(container.new_line.wait(), 1.0)
        return response

    async def serve_logs(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self.container_logs)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.args.port, ssl_context=self.server_tls())
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return runner

    def server_tls(self) -> ssl.SSLContext:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        stamp = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(stamp - datetime.timedelta(minutes=5))
            .not_valid_after(stamp + datetime.timedelta(days=7))
            .sign(key, hashes.SHA256())
        )
        cert_path, key_path = self.log_dir / "kubelet.crt", self.log_dir / "kubelet.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        return context

    # -- lifecycle -------------------------------------------------------------------

    def kill_all(self) -> None:
        for container in self.containers.values():
            if container.process is not None and container.process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(container.process.pid, signal.SIGKILL)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        runner = await self.serve_logs()
        await self.register()
        print(f"node {self.name} ready, kubelet port {self.port}", flush=True)
        tasks = [asyncio.create_task(self.heartbeat()), asyncio.create_task(self.watch_pods())]
        await self.stopping.wait()
        # Like a machine dying: processes end, nothing more is reported.
        self.kill_all()
        for task in [*tasks, *self.tasks.values()]:
            task.cancel()
        await runner.cleanup()
        await self.client.session.close()


def field_value(pod: dict[str, Any], path: str, node: str) -> str:
    meta = pod["metadata"]
    if path.startswith(("metadata.annotations[", "metadata.labels[")):
        kind, key = path[len("metadata.") :].split("[", 1)
        return str(meta.get(kind, {}).get(key.strip("]'\""), ""))
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": node,
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    return str(simple.get(path, ""))


def log(message: str) -> None:
    print(f"{now_nano()} {message}", file=sys.stderr, flush=True)


def _log_failure(task: asyncio.Task[None]) -> None:
    """A pod's task must not die silently: its pod would look running forever."""
    if not task.cancelled() and task.exception() is not None:
        log(f"pod task failed: {task.exception()!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--cpu", default="4")
    parser.add_argument("--memory", default="8Gi")
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("--instance-type", default="cpu-standard")
    parser.add_argument("--taint", action="append", default=[])
    parser.add_argument("--log-dir")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--image-map", action="append", default=[], help="GLOB=PYTHON_PREFIX")
    args = parser.parse_args()

    async def serve() -> None:
        await NodeAgent(args).run()  # aiohttp sessions must be made inside the loop

    asyncio.run(serve())


if __name__ == "__main__":
    main()
