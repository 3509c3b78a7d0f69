"""The whole test cluster: control plane, nodes, test namespaces and RBAC.

Nodes are real kubelets, each with its own containerd and runc (``nodes.RealNode``),
pulling images the suite builds from Debian packages and serves from its own registry.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tests.cluster import hostenv, pki
from tests.cluster.controlplane import NODE_MONITOR_GRACE, ControlPlane

if TYPE_CHECKING:
    from tests.cluster.nodes import RealNode
    from tests.cluster.stores import Registry, Store

NAMESPACE = "ascend-e2e"
USER_NAMESPACE = "ascend-e2e-user"
GPU_TAINT = "nvidia.com/gpu=present:NoSchedule"
STORAGE_SECRET = "ascend-test-storage"

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
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]},
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "verbs": ["get", "list", "create", "patch", "delete"],
            },
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

# The API server's client identity towards kubelets (logs, exec, port-forward).
_KUBELET_API_RBAC = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRoleBinding",
    "metadata": {"name": "ascend-test-apiserver-kubelet"},
    "roleRef": {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:kubelet-api-admin",
    },
    "subjects": [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": pki.KUBELET_CLIENT_USER}
    ],
}


def check_node_mode() -> None:
    """Refuse the retired node agents: ``ASCEND_TEST_NODES`` may only be ``real``."""
    mode = os.environ.get("ASCEND_TEST_NODES", "real")
    if mode != "real":
        raise RuntimeError(
            f"ASCEND_TEST_NODES={mode!r}: the test cluster's nodes are always real kubelets "
            "now (the Python node agents were retired); unset it, or use "
            "ASCEND_TEST_CLUSTER=kind for kind"
        )


class Cluster:
    """Control plane + nodes (default topology: two CPU nodes and one GPU node)."""

    def __init__(
        self, data_dir: Path | None = None, *, node_grace: str = NODE_MONITOR_GRACE
    ) -> None:
        """``node_grace``: how long a silent node stays Ready (short by default, so that
        node-loss tests are quick; longer for heavy loads on small machines)."""
        check_node_mode()
        self._own_data_dir = data_dir is None  # made here: removed by a clean stop()
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="ascend-testcluster-"))
        self.control_plane = ControlPlane(self.data_dir, node_grace=node_grace)
        self.registry: Registry | None = None
        # The same images behind Basic auth (set by start()): pushes and pulls need the
        # credentials it holds, as a private registry of a real cluster does.
        self.private_registry: Registry | None = None
        self._images: list[str] = []
        self._host_lock: IO[str] | None = None
        self.host_before: dict[str, Any] = {}
        # After stop(): what the nodes left changed on the host (empty when restored).
        self.host_changes: dict[str, Any] = {}
        self.storage: Store | None = None  # S3 that pods can reach (set by start())
        self.nodes: dict[str, RealNode] = {}
        self.namespace = NAMESPACE
        self.user_namespace = USER_NAMESPACE

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    @property
    def unprivileged_kubeconfig(self) -> Path:
        return self.control_plane.unprivileged_kubeconfig

    @property
    def suite_address(self) -> str:
        """Where pods reach servers the suite starts: an address on ``lo`` the suite adds
        (pods cannot reach ``127.0.0.1``)."""
        return hostenv.SERVICE_ADDRESS

    def storage_settings(self) -> dict[str, Any]:
        """``ascend.configure`` arguments for a fresh prefix in the cluster's S3 store,
        which every pod can read (credentials reach pods through the Secret
        ``STORAGE_SECRET``); the store's credentials are put in this process's
        environment."""
        assert self.storage is not None, "start() the cluster first"
        self.storage.activate()
        return {
            "storage": f"{self.storage.url}/{uuid.uuid4().hex}",
            "storage_options": self.storage.storage_options,
            "storage_secret": STORAGE_SECRET,
        }

    def _make_real_nodes(self) -> None:
        """The registry with the suite's images, then one RealNode per topology entry."""
        from tests.cluster import images, stores
        from tests.cluster.nodes import RealNode

        self.registry = stores.start_registry(
            self.data_dir / "registry", host=hostenv.SERVICE_ADDRESS
        )
        self._images = list(images.push_all(self.registry.url))
        self.private_registry = stores.start_registry(
            self.data_dir / "registry-private",
            host=hostenv.SERVICE_ADDRESS,
            private=True,
            storage=self.data_dir / "registry" / "registry-data",
        )
        self.storage = stores.start_s3(self.data_dir / "s3", host=hostenv.SERVICE_ADDRESS)
        mirrors = {r: self.registry.url for r in ("docker.io", "ghcr.io", "registry.k8s.io")}
        mirrors[self.registry.url] = self.registry.url  # itself, over plain HTTP (env images)
        mirrors[self.private_registry.url] = self.private_registry.url
        pki_dir = self.data_dir / "pki"
        for index, (name, (_, _, gpus, instance_type, taints)) in enumerate(
            TOPOLOGY.items(), start=1
        ):
            root = self.data_dir / f"ascend-testnodes-{name}"
            root.mkdir(parents=True, exist_ok=True)
            creds = pki.node(pki_dir, name, hostenv.node_address(index))
            kubeconfig = pki.kubeconfig(
                root / "kubelet.kubeconfig",
                self.control_plane.server,
                self.control_plane.creds.ca_cert,
                user=f"system:node:{name}",
                cert=creds.client_cert,
                key=creds.client_key,
            )
            self.nodes[name] = RealNode(
                index=index,
                name=name,
                root=root,
                kubeconfig=kubeconfig,
                credentials=creds,
                ca_cert=self.control_plane.creds.ca_cert,
                labels={"node.kubernetes.io/instance-type": instance_type},
                taints=taints,
                extended_resources={"nvidia.com/gpu": str(gpus)} if gpus else {},
                mirrors=mirrors,
                admin_kubeconfig=self.control_plane.kubeconfig,
            )

    def start(self) -> Cluster:
        try:
            self._host_lock = hostenv.lock()  # one cluster with real nodes at a time
            hostenv.restore(keep_service_address=True)  # an interrupted run's leftovers
            self.host_before = hostenv.view()
            hostenv.prepare()
            self.control_plane.start()
            self._make_real_nodes()
            for node in self.nodes.values():
                node.start()
            manifest = self.data_dir / "rbac.json"
            items = [*_RBAC, _KUBELET_API_RBAC]
            manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
            applied = self.control_plane.kubectl("apply", "-f", str(manifest))
            if applied.returncode != 0:
                raise RuntimeError(f"applying test namespaces and RBAC failed: {applied.stderr}")
            self._pull_everywhere()
            for node in self.nodes.values():
                node.wait_ready()
            self._wait_service_account(NAMESPACE)
            self._wait_service_account(USER_NAMESPACE)
            if self.storage is not None:
                self._storage_secret()
        except BaseException:
            self.stop()
            raise
        return self

    def _pull_everywhere(self) -> None:
        """Every node pulls the suite's images at once (a first call then starts in about a
        second instead of waiting for a pull)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(self.nodes)) as pool:
            pulls = [pool.submit(n.pull, self._images) for n in self.nodes.values()]
            for pull in pulls:
                pull.result()

    def _storage_secret(self) -> None:
        """The S3 credentials as a Secret in each test namespace, for pods' ``envFrom``
        (ascend's ``storage_secret`` setting)."""
        assert self.storage is not None
        for namespace in (NAMESPACE, USER_NAMESPACE):
            args = [f"--from-literal={k}={v}" for k, v in self.storage.env.items()]
            result = self.control_plane.kubectl(
                "create", "secret", "generic", STORAGE_SECRET, "-n", namespace, *args
            )
            if result.returncode != 0:
                raise RuntimeError(f"creating the storage secret failed: {result.stderr}")

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

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop everything and put the host back as found. The data folder (logs, etcd,
        the nodes' disks: up to 2 GB) is removed
        when this cluster made it, unless ``keep_data`` (a failed test session keeps it
        to be read) or something is still mounted below it."""
        try:
            for node in self.nodes.values():
                node.destroy()
            for service in (self.storage, self.registry, self.private_registry):
                if service is not None:
                    service.stop()
            self.control_plane.stop()
        finally:
            if self._host_lock is not None:
                hostenv.restore()
                # Compared before the lock is released: the next cluster changes the host.
                after = hostenv.view()
                before = self.host_before
                self.host_changes = {
                    k: (before[k], after[k]) for k in after if before[k] != after[k]
                }
                self._host_lock.close()
                self._host_lock = None
            if self._own_data_dir and not keep_data:
                self._remove_data_dir()

    def _remove_data_dir(self) -> None:
        root = str(self.data_dir.resolve())
        with open("/proc/self/mountinfo") as info:
            mounted = [
                line.split()[4]
                for line in info
                if line.split()[4] == root or line.split()[4].startswith(root + "/")
            ]
        if mounted:
            print(f"keeping {root}: still mounted below it: {mounted[:3]}", file=sys.stderr)
            return
        shutil.rmtree(root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
