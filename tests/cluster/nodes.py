"""A real node: a kubelet (from the test cluster's binary) with its own containerd and
runc (Debian's packages) and pod networking through the CNI bridge plugin.

Each node has its own everything, as a machine would: containerd root, state, socket and
runc root; CNI bridge and pod subnet; cgroup root (``/ascend-testnode-<name>`` in every
controller, where its kubelet, containerd, shims and containers all live); kubelet root
and pod-log folders; an address on ``lo`` it serves on. ``stop()`` is machine death:
every process of the node is killed at once (the freezer cgroup is frozen first so
nothing escapes), nothing is reported to the API server. ``start()`` brings it back with
its disk (containerd root, kubelet root) intact, like a reboot.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from tests.cluster import build, debs, hostenv
from tests.cluster.controlplane import Process, free_port
from tests.cluster.pki import NodeCredentials

SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"
# How often a kubelet tells the API server it is alive; with the controller-manager's
# short grace period (controlplane.NODE_MONITOR_GRACE) a lost node is NotReady in ~10 s.
LEASE_SECONDS = 8
STATUS_SECONDS = "2s"


def _cgroup_controllers() -> list[Path]:
    return [
        c
        for c in sorted(hostenv.CGROUP_FS.iterdir())
        if c.is_dir() and not c.is_symlink() and c.name != "unified"
    ]


def write_mirror(root: Path, registry: str, endpoint: str) -> Path:
    """Make the containerd under ``root`` pull ``registry``'s images from ``endpoint``
    (``host:port``, plain HTTP); containerd reads its hosts folder at every pull, so this
    works on a running node too. Returns the registry's folder."""
    folder = root / "certs.d" / registry
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hosts.toml").write_text(
        f'server = "https://{registry}"\n\n'
        f'[host."http://{endpoint}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        "  skip_verify = true\n"
    )
    return folder


class RealNode:
    """One kubelet + containerd "machine" (see the module docstring)."""

    def __init__(
        self,
        *,
        index: int,
        name: str,
        root: Path,
        kubeconfig: Path,
        credentials: NodeCredentials,
        ca_cert: Path,
        labels: dict[str, str],
        taints: tuple[str, ...],
        extended_resources: dict[str, str],
        mirrors: dict[str, str],
        admin_kubeconfig: Path,
    ) -> None:
        assert hostenv.NODE_ROOT_MARKER in str(root) + "/", root
        self.index = index
        self.name = name
        self.root = root
        self.address = hostenv.node_address(index)
        self.bridge = f"{hostenv.BRIDGE_PREFIX}{index}"
        self.subnet = f"198.18.{10 + index}.0/24"
        self.cgroup = f"/{hostenv.CGROUP_PREFIX}{name}"
        self.kubeconfig = kubeconfig
        self.admin_kubeconfig = admin_kubeconfig
        self.extended_resources = extended_resources
        self.socket = root / "containerd.sock"
        self.healthz_port = free_port()
        self._write_containerd_config(mirrors)
        self._write_cni_config()
        self._write_kubelet_config(credentials, ca_cert, labels, taints)
        containerd_dir = debs.unpacked("containerd") / "usr" / "bin"
        path = f"{containerd_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        env = {**os.environ, "PATH": path}
        self.containerd = Process(
            f"containerd {name}",
            [str(containerd_dir / "containerd"), "--config", str(root / "containerd.toml")],
            root / "containerd.log",
            env=env,
            preexec_fn=self._enter_cgroup,
        )
        self.kubelet = Process(
            f"kubelet {name}",
            [
                str(build.binary_path()),
                "kubelet",
                f"--config={root / 'kubelet.yaml'}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={root / 'kubelet'}",
                f"--hostname-override={name}",
                f"--node-ip={self.address}",
                "--node-labels=" + ",".join(f"{k}={v}" for k, v in labels.items()),
                "--v=1",
            ],
            root / "kubelet.log",
            env=env,
            preexec_fn=self._enter_cgroup,
        )

    # -- configuration ---------------------------------------------------------------

    def _write_containerd_config(self, mirrors: dict[str, str]) -> None:
        root = self.root
        runc = debs.unpacked("runc") / "usr" / "sbin" / "runc"
        cni_bin = debs.unpacked("containernetworking-plugins") / "usr" / "lib" / "cni"
        for sub in ("cni", "certs.d", "runc", "opt", "containerd"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (root / "containerd.toml").write_text(
            f"""version = 2
root = "{root / "containerd" / "root"}"
state = "{root / "containerd" / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{self.socket}"
[ttrpc]
  address = ""
[debug]
  address = ""
  level = "warn"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"
[{cri}]
  sandbox_image = "{SANDBOX_IMAGE}"
  # This VM lacks CAP_SYS_RESOURCE: negative oom_score_adj values cannot be set.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{root / "runc"}"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{root / "cni"}"
  [{cri}.registry]
    config_path = "{root / "certs.d"}"
"""
        )
        for registry, endpoint in mirrors.items():
            write_mirror(root, registry, endpoint)

    def _write_cni_config(self) -> None:
        config = {
            "cniVersion": "1.0.0",
            "name": f"ascend-{self.name}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.root / "cni-ipam"),
                    },
                }
            ],
        }
        (self.root / "cni" / "10-ascend.conflist").write_text(json.dumps(config, indent=2))

    def _write_kubelet_config(
        self,
        credentials: NodeCredentials,
        ca_cert: Path,
        labels: dict[str, str],
        taints: tuple[str, ...],
    ) -> None:
        taint_list = []
        for spec in taints:
            key_value, effect = spec.rsplit(":", 1)
            key, _, value = key_value.partition("=")
            taint_list.append({"key": key, "value": value, "effect": effect})
        for sub in ("kubelet", "pod-logs", "volume-plugins"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This host mounts cgroup v1 only; kubelet 1.36 refuses it unless told.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup,
            "cgroupsPerQOS": True,
            "address": self.address,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "podLogsDir": str(self.root / "pod-logs"),
            "volumePluginDir": str(self.root / "volume-plugins"),
            "tlsCertFile": str(credentials.serving_cert),
            "tlsPrivateKeyFile": str(credentials.serving_key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "failSwapOn": False,
            "serializeImagePulls": False,
            "registerWithTaints": taint_list,
            "nodeLeaseDurationSeconds": LEASE_SECONDS,
            "nodeStatusUpdateFrequency": STATUS_SECONDS,
            "nodeStatusReportFrequency": "10s",
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "resolvConf": "",
            "staticPodPath": "",
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "maxPods": 110,
            "shutdownGracePeriod": "0s",
        }
        (self.root / "kubelet.yaml").write_text(json.dumps(config, indent=2))

    # -- life cycle --------------------------------------------------------------------

    def _cgroup_dir(self, controller: Path) -> Path:
        return controller / self.cgroup.lstrip("/")

    def _make_cgroups(self) -> None:
        """The node's cgroup root in every controller (the kubelet needs it to exist), and
        a ``runtime`` child for the kubelet and containerd themselves."""
        for controller in _cgroup_controllers():
            for folder in (self._cgroup_dir(controller), self._cgroup_dir(controller) / "runtime"):
                folder.mkdir(exist_ok=True)
                if controller.name.startswith("cpuset"):
                    for knob in ("cpuset.cpus", "cpuset.mems"):
                        parent = (folder.parent / knob).read_text()
                        (folder / knob).write_text(parent)

    def _enter_cgroup(self) -> None:  # runs in the child, before exec
        pid = str(os.getpid())
        for controller in _cgroup_controllers():
            with contextlib.suppress(OSError):
                (self._cgroup_dir(controller) / "runtime" / "cgroup.procs").write_text(pid)

    def tasks(self) -> list[int]:
        tasks: set[int] = set()
        for controller in _cgroup_controllers():
            top = self._cgroup_dir(controller)
            for folder, _, _ in os.walk(top):
                with contextlib.suppress(OSError):
                    tasks |= {int(t) for t in (Path(folder) / "cgroup.procs").read_text().split()}
        tasks.discard(os.getpid())
        return sorted(tasks)

    @property
    def pid(self) -> int | None:
        return self.kubelet.popen.pid if self.kubelet.popen else None

    @property
    def log_path(self) -> Path:
        return self.kubelet.log_path

    @property
    def running(self) -> bool:
        return self.kubelet.running

    def start(self) -> RealNode:
        self._make_cgroups()
        hostenv.add_address(self.address)
        self.containerd.start()
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if not self.containerd.running or time.monotonic() > deadline:
                raise RuntimeError(
                    f"containerd of node {self.name} did not start:\n{self.containerd.log_tail()}"
                )
            time.sleep(0.1)
        self.kubelet.start()
        return self

    def pull(self, images: list[str]) -> None:
        """Pull ``images`` into this node's containerd (through its mirrors), as a node
        image with pre-loaded images would have them."""
        ctr = debs.unpacked("containerd") / "usr" / "bin" / "ctr"
        for image in images:
            result = subprocess.run(
                [
                    str(ctr),
                    f"--address={self.socket}",
                    "--namespace=k8s.io",
                    "images",
                    "pull",
                    f"--hosts-dir={self.root / 'certs.d'}",
                    image,
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(f"node {self.name} could not pull {image}: {result.stderr}")

    def stop(self) -> None:
        """Machine death: kill the kubelet, containerd, shims and containers at once."""
        freezer = next((c for c in _cgroup_controllers() if c.name == "freezer"), None)
        hostenv.kill_tree(self.tasks, freezer and self._cgroup_dir(freezer))
        self.kubelet.stop(timeout=1)
        self.containerd.stop(timeout=1)
        self.socket.unlink(missing_ok=True)

    def restart(self) -> RealNode:
        self.stop()
        return self.start()

    def destroy(self) -> None:
        """Stop and remove everything of this node from the host (mounts, cgroups,
        bridge, address); its folder is left for the logs."""
        self.stop()
        hostenv.unmount(hostenv.mounts_under((str(self.root) + "/",)))
        dirs: list[Path] = []
        for controller in _cgroup_controllers():
            top = self._cgroup_dir(controller)
            dirs += [Path(d) for d, _, _ in os.walk(top)]
        hostenv.remove_cgroups(sorted(dirs, key=lambda p: len(p.parts), reverse=True))
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        subprocess.run(
            ["ip", "addr", "del", f"{self.address}/32", "dev", "lo"], capture_output=True
        )

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(build.binary_path()), "kubectl", f"--kubeconfig={self.admin_kubeconfig}", *args],
            capture_output=True,
            text=True,
        )

    def wait_ready(self, timeout: float = 90) -> None:
        """Wait until the Node is Ready without not-ready/unreachable taints, advertising
        its extended resources (patched into its status after each registration, as a
        device plugin would report them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.kubelet.running:
                raise RuntimeError(f"kubelet {self.name} exited:\n{self.kubelet.log_tail()}")
            if not self.containerd.running:
                raise RuntimeError(f"containerd {self.name} exited:\n{self.containerd.log_tail()}")
            result = self.kubectl("get", "node", self.name, "-o", "json")
            if result.returncode == 0:
                node = json.loads(result.stdout)
                capacity = node["status"].get("capacity", {})
                missing = {k: v for k, v in self.extended_resources.items() if capacity.get(k) != v}
                if missing:
                    self._advertise(missing)
                ready = any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in node["status"].get("conditions", [])
                )
                tainted = any(
                    t["key"].startswith("node.kubernetes.io/")
                    for t in node["spec"].get("taints", [])
                )
                if ready and not tainted and not missing:
                    return
            time.sleep(0.3)
        raise RuntimeError(
            f"node {self.name} not ready after {timeout:.0f} s:\n{self.kubelet.log_tail()}"
        )

    def _advertise(self, resources: dict[str, str]) -> None:
        ops = [
            {"op": "add", "path": f"/status/capacity/{k.replace('/', '~1')}", "value": v}
            for k, v in resources.items()
        ]
        self.kubectl(
            "patch", "node", self.name, "--subresource=status", "--type=json", "-p", json.dumps(ops)
        )
