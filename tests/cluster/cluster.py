"""The whole test cluster: control plane, node agents, test namespaces and RBAC."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tests.cluster import pki
from tests.cluster.controlplane import ControlPlane
from tests.cluster.nodeagent import NodeAgentProcess

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


class Cluster:
    """Control plane + node agents (default topology: two CPU nodes and one GPU node)."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="ascend-testcluster-"))
        self.control_plane = ControlPlane(self.data_dir)
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
