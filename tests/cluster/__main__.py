"""The test cluster from the command line.

python -m tests.cluster build       compile the control plane and kubelet, build the nodes'
                                    images (each cached, see docs/testing.md)
python -m tests.cluster up          start cluster + stores in the background, print how to use them
python -m tests.cluster status      what is running
python -m tests.cluster down        stop everything
python -m tests.cluster kind-up     a kind cluster instead (needs Docker and kind)
python -m tests.cluster kind-down
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster import build, state

KIND_CLUSTER = "ascend-test"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_build() -> int:
    print(build.build())
    from tests.cluster import images

    for name in images.images():  # the nodes' images, built once from Debian packages
        print(name)
    return 0


def cmd_serve() -> int:
    """The background supervisor started by ``up`` (not meant to be run by hand)."""
    from tests.cluster import hostenv, stores
    from tests.cluster.cluster import Cluster
    from tests.cluster.controlplane import install_signal_handlers

    install_signal_handlers()
    data_dir = Path(tempfile.mkdtemp(prefix="ascend-testcluster-"))
    cluster = Cluster(data_dir).start()
    services = stores.start_all(data_dir / "stores", hostenv.SERVICE_ADDRESS)  # pods reach it
    record = {
        "pid": os.getpid(),
        "data_dir": str(data_dir),
        "kubeconfig": str(cluster.kubeconfig),
        "unprivileged_kubeconfig": str(cluster.unprivileged_kubeconfig),
        "namespace": cluster.namespace,
        "stores": {
            name: {"url": s.url, "storage_options": s.storage_options, "env": s.env}
            for name, s in services.items()
            if isinstance(s, stores.Store)
        },
        "registry": next(
            (s.url for s in services.values() if isinstance(s, stores.Registry)), None
        ),
    }
    state.write(record)
    try:
        while True:
            time.sleep(3600)
    finally:
        for service in services.values():
            service.stop()
        cluster.stop()


def cmd_up() -> int:
    current = state.read()
    if current and _alive(current["pid"]):
        _print_usage(current)
        return 0
    build.build()
    state.run_dir().mkdir(parents=True, exist_ok=True)
    state.state_file().unlink(missing_ok=True)
    log = state.run_dir() / "supervisor.log"
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster", "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        current = state.read()
        if current and current.get("pid") == supervisor.pid:
            _print_usage(current)
            return 0
        if supervisor.poll() is not None:
            print(
                f"the test cluster failed to start; see {log}:\n{log.read_text()[-3000:]}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.5)
    print(f"the test cluster did not start within 5 minutes; see {log}", file=sys.stderr)
    return 1


def _print_usage(current: dict) -> None:  # type: ignore[type-arg]
    print(f"export KUBECONFIG={current['kubeconfig']}")
    print(f"# unprivileged user: KUBECONFIG={current['unprivileged_kubeconfig']}")
    print(f"# test namespace: {current['namespace']}; logs and data: {current['data_dir']}")
    for name, store in current["stores"].items():
        env = " ".join(f"{k}={v!r}" for k, v in store["env"].items())
        print(
            f"# {name}: {store['url']}  storage_options={json.dumps(store['storage_options'])}  env: {env}"
        )
    if current.get("registry"):
        print(f"# OCI registry: {current['registry']}")
    print("# stop with: nox -s cluster -- down")


def cmd_status() -> int:
    current = state.read()
    if not current or not _alive(current["pid"]):
        print("no test cluster is running")
        return 1
    _print_usage(current)
    return 0


def cmd_down() -> int:
    current = state.read()
    if current and _alive(current["pid"]):
        os.kill(current["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(current["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        print("test cluster stopped")
    else:
        print("no test cluster was running")
    state.state_file().unlink(missing_ok=True)
    from tests.cluster import hostenv

    # Real nodes: undo whatever an interrupted run left on the host (no-op otherwise),
    # unless a test session's cluster with real nodes is running now.
    slot = hostenv.try_lock()
    if slot is None:
        print("a test cluster with real nodes is running (a test session): left alone")
        return 0
    with slot:
        hostenv.restore()
    return 0


def _require(tool: str, how: str) -> None:
    if shutil.which(tool) is None:
        print(f"`{tool}` is not on PATH. {how}", file=sys.stderr)
        raise SystemExit(1)


def cmd_kind_up() -> int:
    _require("docker", "kind needs a Docker (or Podman) engine; without one, use `nox -s e2e`.")
    _require("kind", "Install kind: `go install sigs.k8s.io/kind@latest` (see docs/testing.md).")
    kubeconfig = state.kind_kubeconfig()
    state.run_dir().mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "kind",
            "create",
            "cluster",
            "--name",
            KIND_CLUSTER,
            "--kubeconfig",
            str(kubeconfig),
            "--wait",
            "120s",
        ],
        check=True,
    )
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    image = f"ghcr.io/ascend-k8s/ascend-k8s-runner:0.1.0-py{py}"
    runner_dir = Path(__file__).resolve().parents[2] / "runner"
    import cloudpickle

    subprocess.run(
        [
            "docker",
            "build",
            str(runner_dir),
            "-t",
            image,
            "--build-arg",
            f"PYTHON_VERSION={py}",
            "--build-arg",
            f"CLOUDPICKLE_VERSION={cloudpickle.__version__}",
        ],
        check=True,
    )
    subprocess.run(["kind", "load", "docker-image", image, "--name", KIND_CLUSTER], check=True)
    from tests.cluster.cluster import _RBAC

    manifest = state.run_dir() / "kind-rbac.json"
    manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": _RBAC}))
    subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", "apply", "-f", str(manifest)], check=True
    )
    print(f"export KUBECONFIG={kubeconfig}")
    return 0


def cmd_kind_down() -> int:
    if shutil.which("kind"):
        subprocess.run(["kind", "delete", "cluster", "--name", KIND_CLUSTER], check=False)
    state.kind_kubeconfig().unlink(missing_ok=True)
    return 0


COMMANDS = {
    "build": cmd_build,
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "serve": cmd_serve,
    "kind-up": cmd_kind_up,
    "kind-down": cmd_kind_down,
}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    return COMMANDS[sys.argv[1]]()


if __name__ == "__main__":
    raise SystemExit(main())
