"""A real Kubernetes control plane on loopback: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, each its own process."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.cluster import build, pki

# Node failure becomes visible in seconds instead of minutes (see docs/testing.md).
NODE_MONITOR_GRACE = "8s"
NODE_MONITOR_PERIOD = "2s"
TOLERATION_SECONDS = "2"

# Strong references: a process whose handle was dropped (say, by an exception during
# start-up) must still be stopped at exit.
_live: set[Process] = set()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Process:
    """A component process in its own process group, logging to a file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.preexec_fn = preexec_fn
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
                preexec_fn=self.preexec_fn,
            )
        finally:
            log.close()
        _live.add(self)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if self.popen is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # anything the component spawned
        _live.discard(self)
        self.popen = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _stop_all() -> None:
    for proc in list(_live):
        proc.stop(timeout=3)


atexit.register(_stop_all)


def _on_signal(signum: int, _frame: object) -> None:
    _stop_all()
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Stop every component on SIGTERM/SIGINT (call from a main thread)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, _on_signal)


def wait_http(
    url: str, process: Process, *, timeout: float, context: ssl.SSLContext | None = None
) -> None:
    """Wait until ``url`` answers 200, failing early (with the log) if the process dies."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not process.running:
            raise RuntimeError(f"{process.name} exited during start-up:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(
        f"{process.name} not ready at {url} after {timeout:.0f} s ({last}):\n{process.log_tail()}"
    )


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        node_grace: str = NODE_MONITOR_GRACE,
    ) -> None:
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="ascend-testcluster-"))
        self.node_grace = node_grace
        self.binary = build.build()
        self.creds = pki.create(self.data_dir / "pki")
        self.etcd_port = free_port()
        self.apiserver_port = free_port()
        self.server = f"https://127.0.0.1:{self.apiserver_port}"
        self.kubeconfig = pki.kubeconfig(
            self.data_dir / "admin.kubeconfig",
            self.server,
            self.creds.ca_cert,
            user="admin",
            cert=self.creds.admin_cert,
            key=self.creds.admin_key,
        )
        self.unprivileged_kubeconfig = pki.kubeconfig(
            self.data_dir / "unprivileged.kubeconfig",
            self.server,
            self.creds.ca_cert,
            user=pki.UNPRIVILEGED_USER,
            token=self.creds.unprivileged_token,
        )
        self._cm_kubeconfig = pki.kubeconfig(
            self.data_dir / "controller-manager.kubeconfig",
            self.server,
            self.creds.ca_cert,
            user="controller-manager",
            cert=self.creds.controller_manager_cert,
            key=self.creds.controller_manager_key,
        )
        self._scheduler_kubeconfig = pki.kubeconfig(
            self.data_dir / "scheduler.kubeconfig",
            self.server,
            self.creds.ca_cert,
            user="scheduler",
            cert=self.creds.scheduler_cert,
            key=self.creds.scheduler_key,
        )
        self.etcd = self._component("etcd", self._etcd_args())
        self.apiserver = self._component("kube-apiserver", self._apiserver_args())
        self.controller_manager = self._component("kube-controller-manager", self._cm_args())
        self.scheduler = self._component("kube-scheduler", self._scheduler_args())

    def _component(self, name: str, args: list[str]) -> Process:
        return Process(name, [str(self.binary), name, *args], self.data_dir / f"{name}.log")

    def _etcd_args(self) -> list[str]:
        peer = free_port()
        return [
            "--name=default",
            f"--data-dir={self.data_dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",  # test data: durability buys nothing, fsync costs seconds
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        c = self.creds
        return [
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--secure-port={self.apiserver_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--tls-cert-file={c.serving_cert}",
            f"--tls-private-key-file={c.serving_key}",
            f"--client-ca-file={c.ca_cert}",
            f"--token-auth-file={c.token_file}",
            "--authorization-mode=Node,RBAC",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--endpoint-reconciler-type=none",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={c.service_account_pub}",
            f"--service-account-signing-key-file={c.service_account_key}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--default-not-ready-toleration-seconds={TOLERATION_SECONDS}",
            f"--default-unreachable-toleration-seconds={TOLERATION_SECONDS}",
            "--profiling=false",
            "--v=1",
            # Kubelets are verified with the cluster CA, and spoken to with the API
            # server's own client certificate.
            f"--kubelet-client-certificate={c.kubelet_client_cert}",
            f"--kubelet-client-key={c.kubelet_client_key}",
            f"--kubelet-certificate-authority={c.ca_cert}",
        ]

    def _cm_args(self) -> list[str]:
        c = self.creds
        return [
            f"--kubeconfig={self._cm_kubeconfig}",
            "--leader-elect=false",
            "--use-service-account-credentials",
            f"--service-account-private-key-file={c.service_account_key}",
            f"--root-ca-file={c.ca_cert}",
            f"--secure-port={free_port()}",
            "--bind-address=127.0.0.1",
            f"--node-monitor-grace-period={self.node_grace}",
            f"--node-monitor-period={NODE_MONITOR_PERIOD}",
            "--v=1",
        ]

    def _scheduler_args(self) -> list[str]:
        config = self.data_dir / "scheduler.yaml"
        config.write_text(
            "apiVersion: kubescheduler.config.k8s.io/v1\n"
            "kind: KubeSchedulerConfiguration\n"
            f"clientConnection:\n  kubeconfig: {self._scheduler_kubeconfig}\n"
            "leaderElection:\n  leaderElect: false\n"
        )
        return [
            f"--config={config}",
            f"--secure-port={free_port()}",
            "--bind-address=127.0.0.1",
            "--v=1",
        ]

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.creds.ca_cert))
        context.load_cert_chain(str(self.creds.admin_cert), str(self.creds.admin_key))
        return context

    def start(self) -> ControlPlane:
        self.etcd.start()
        wait_http(f"http://127.0.0.1:{self.etcd_port}/health", self.etcd, timeout=60)
        self.start_apiserver()
        self.controller_manager.start()
        self.scheduler.start()
        return self

    def start_apiserver(self) -> None:
        self.apiserver.start()
        wait_http(f"{self.server}/readyz", self.apiserver, timeout=120, context=self._tls())

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again on the same port and data."""
        self.apiserver.stop()
        self.start_apiserver()

    def metrics(self) -> str:
        """The apiserver's Prometheus metrics (``apiserver_request_total`` and friends)."""
        with urllib.request.urlopen(f"{self.server}/metrics", timeout=10, context=self._tls()) as r:
            return str(r.read().decode())

    def kubectl(
        self, *args: str, kubeconfig: Path | None = None, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run this cluster's own kubectl (the same version as the control plane)."""
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            [str(self.binary), "kubectl", f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            **kwargs,
        )

    def stop(self) -> None:
        for component in (self.scheduler, self.controller_manager, self.apiserver, self.etcd):
            component.stop()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
