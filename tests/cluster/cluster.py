"""The whole test cluster: control plane, node agents, test namespaces and RBAC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster import build, pki
from tests.cluster.controlplane import NODE_MONITOR_GRACE, ControlPlane, Process

NAMESPACE = "ascend-e2e"
USER_NAMESPACE = "ascend-e2e-user"
GPU_TAINT = "nvidia.com/gpu=present:NoSchedule"

# name -> (cpu, memory, gpus, instance type, taints)
TOPOLOGY: dict[str, tuple[str, str, int, str, tuple[str, ...]]] = {
    "cpu-1": ("4", "8Gi", 0, "cpu-standard", ()),
    "cpu-2": ("4", "8Gi", 0, "cpu-standard", ()),
    "gpu-1": ("8", "32Gi", 2, "gpu-standard", (GPU_TAINT,)),
}

_RBAC = [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": USER_NAMESPACE}},
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "ascend-user", "namespace": USER_NAMESPACE},
        "rules": [
            {
                "apiGroups": ["batch"],
                "resources": ["jobs"],
                "verbs": ["get", "list", "watch", "create", "delete"],
            },
            {
                "apiGroups": [""],
                "resources": ["pods", "pods/log", "events"],
                "verbs": ["get", "list", "watch"],
            },
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]},
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "ascend-user", "namespace": USER_NAMESPACE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ascend-user"},
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": pki.UNPRIVILEGED_USER}
        ],
    },
]


class NodeAgentProcess:
    """A node agent running as its own process (so it can be killed like a machine)."""

    def __init__(
        self,
        kubeconfig: str | Path,
        name: str,
        *,
        cpu: str,
        memory: str,
        gpus: int = 0,
        instance_type: str = "cpu-standard",
        taints: tuple[str, ...] = (),
        log_dir: Path,
        image_map: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.kubeconfig = str(kubeconfig)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "tests.cluster.nodeagent",
            "--kubeconfig",
            self.kubeconfig,
            "--name",
            name,
            "--cpu",
            cpu,
            "--memory",
            memory,
            "--gpus",
            str(gpus),
            "--instance-type",
            instance_type,
            "--log-dir",
            str(self.log_dir),
        ]
        for taint in taints:
            argv += ["--taint", taint]
        for pattern, prefix in (image_map or {}).items():
            argv += ["--image-map", f"{pattern}={prefix}"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        self._process = Process(f"node-agent {name}", argv, self.log_dir / "agent.log", env=env)

    @property
    def pid(self) -> int | None:
        return self._process.popen.pid if self._process.popen else None

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    def start(self) -> NodeAgentProcess:
        self._process.start()
        return self

    def stop(self) -> None:
        """SIGTERM: the agent kills its pods' processes and exits, reporting nothing."""
        self._process.stop()

    def restart(self) -> NodeAgentProcess:
        self.stop()
        return self.start()

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until the Node is Ready and carries no not-ready/unreachable taint."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._process.running:
                raise RuntimeError(f"node agent {self.name} exited:\n{self._process.log_tail()}")
            result = subprocess.run(
                [
                    str(build.binary_path()),
                    "kubectl",
                    f"--kubeconfig={self.kubeconfig}",
                    "get",
                    "node",
                    self.name,
                    "-o",
                    "json",
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode == 0:
                node = json.loads(result.stdout)
                ready = any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in node["status"].get("conditions", [])
                )
                tainted = any(
                    t["key"].startswith("node.kubernetes.io/")
                    for t in node["spec"].get("taints", [])
                )
                if ready and not tainted:
                    return
            time.sleep(0.3)
        raise RuntimeError(
            f"node {self.name} not ready after {timeout:.0f} s:\n{self._process.log_tail()}"
        )


class Cluster:
    """Control plane + node agents (default topology: two CPU nodes and one GPU node)."""

    def __init__(
        self, data_dir: Path | None = None, *, node_grace: str = NODE_MONITOR_GRACE
    ) -> None:
        """``node_grace``: how long a silent node agent stays Ready (short by default, so
        that node-loss tests are quick; longer for heavy loads on small machines)."""
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="ascend-testcluster-"))
        self.control_plane = ControlPlane(self.data_dir, node_grace=node_grace)
        self.nodes = {
            name: NodeAgentProcess(
                self.control_plane.kubeconfig,
                name,
                cpu=cpu,
                memory=memory,
                gpus=gpus,
                instance_type=instance_type,
                taints=taints,
                log_dir=self.data_dir / f"node-{name}",
            )
            for name, (cpu, memory, gpus, instance_type, taints) in TOPOLOGY.items()
        }
        self.namespace = NAMESPACE
        self.user_namespace = USER_NAMESPACE

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    @property
    def unprivileged_kubeconfig(self) -> Path:
        return self.control_plane.unprivileged_kubeconfig

    def start(self) -> Cluster:
        try:
            self.control_plane.start()
            for node in self.nodes.values():
                node.start()
            manifest = self.data_dir / "rbac.json"
            manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": _RBAC}))
            applied = self.control_plane.kubectl("apply", "-f", str(manifest))
            if applied.returncode != 0:
                raise RuntimeError(f"applying test namespaces and RBAC failed: {applied.stderr}")
            for node in self.nodes.values():
                node.wait_ready()
            self._wait_service_account(NAMESPACE)
            self._wait_service_account(USER_NAMESPACE)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_service_account(self, namespace: str) -> None:
        # Pods are refused until the namespace's default service account exists.
        result = self.control_plane.kubectl(
            "wait",
            "--for=create",
            "serviceaccount/default",
            "-n",
            namespace,
            "--timeout=60s",
        )
        if result.returncode != 0:
            raise RuntimeError(f"no default service account in {namespace}: {result.stderr}")

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.control_plane.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
