"""What real test nodes change on this host, and putting it back.

Real kubelets, containerd and the CNI bridge plugin change the host: sysctls (the kubelet
sets ``kernel.panic``, ``kernel.panic_on_oops`` and ``vm.overcommit_memory`` at every
start; the bridge plugin sets ``net.ipv4.ip_forward``), the suite's addresses on ``lo``,
one bridge per node, network namespaces under ``/run/netns``, cgroup trees, mounts under
the nodes' folders, and a few fixed paths (``/var/lib/kubelet``, ``/var/log/containers``,
``/var/lib/cni``, ``/run/containerd``), plus iptables chains when ``iptables`` exists.

``prepare()`` first undoes what an interrupted run left (``restore()``), then records the
host as found in ``<cache>/run/host-baseline.json`` — kept until ``restore()`` has put
everything back, so an interrupted run's changes are still undone by the next ``up``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from tests.cluster import state

# The suite's own addresses (RFC 2544 benchmarking range, never routed outside): pods
# reach the registry and object stores on SERVICE_ADDRESS; node N listens on .10+N.
SUITE_PREFIX = "198.18.0"
SERVICE_ADDRESS = f"{SUITE_PREFIX}.1"
BRIDGE_PREFIX = "ascend-br"
CGROUP_PREFIX = "ascend-testnode-"
NODE_ROOT_MARKER = "/ascend-testnodes-"  # every node folder lives under a dir named so

SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "net.ipv4.ip_forward",
)
FIXED_PATHS = (
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/run/containerd",
    "/run/netns",
    "/usr/libexec/kubernetes",
    "/etc/kubernetes",
)
KUBE_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT", "KUBE-PROXY-CANARY")
CGROUP_FS = Path("/sys/fs/cgroup")


def node_address(index: int) -> str:
    return f"{SUITE_PREFIX}.{10 + index}"


def _baseline_file() -> Path:
    return state.run_dir() / "host-baseline.json"


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    return {name: _sysctl_path(name).read_text().strip() for name in SYSCTLS}


def _netns() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except OSError:
        return []


def _iptables_chains() -> dict[str, list[str]]:
    chains: dict[str, list[str]] = {}
    if shutil.which("iptables") is None:
        return chains
    for table in ("filter", "nat", "mangle"):
        out = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True)
        chains[table] = [ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("-N ")]
    return chains


def _link_names() -> list[str]:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]


def snapshot() -> dict[str, Any]:
    """The parts of the host the nodes touch, as they are now."""
    return {
        "links": _link_names(),
        "sysctls": read_sysctls(),
        "paths": {p: os.path.lexists(p) for p in FIXED_PATHS},
        "netns": _netns(),
        "iptables": _iptables_chains(),
    }


def view() -> dict[str, Any]:
    """Everything the nodes may change, for before/after comparisons: sysctls, links,
    addresses on ``lo``, mount points, fixed paths, cgroup folders, network namespaces and
    iptables chains."""
    with open("/proc/self/mountinfo") as info:
        mounts = sorted({line.split()[4] for line in info})
    return {
        **snapshot(),
        "links": sorted(_link_names()),
        "lo": sorted(a for a in _lo_addresses() if a != f"{SERVICE_ADDRESS}/32"),
        "mounts": mounts,
        "cgroups": sorted(str(p) for p in _cgroup_dirs()),
    }


def _lo_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "lo"], capture_output=True)
    return [line.split()[3] for line in out.stdout.decode().splitlines()]


def lock() -> IO[str]:
    """Wait for, then hold, the host's one slot for a cluster with real nodes (node
    addresses, bridges, cgroup roots and fixed paths are the same for every cluster).
    Released by closing the file, or by the holder's death."""
    import fcntl
    import sys

    state.run_dir().mkdir(parents=True, exist_ok=True)
    handle = (state.run_dir() / "real-nodes.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(
            "another test cluster with real nodes runs on this host; waiting for it",
            file=sys.stderr,
            flush=True,
        )
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def try_lock() -> IO[str] | None:
    """The slot if no cluster with real nodes holds it, else None (no wait)."""
    import fcntl

    state.run_dir().mkdir(parents=True, exist_ok=True)
    handle = (state.run_dir() / "real-nodes.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def prepare() -> None:
    """Undo leftovers of an interrupted run, then record the host and add the suite's
    addresses on ``lo`` (the service address may already be there: stores started
    before the cluster listen on it). Call with ``lock()`` held."""
    restore(keep_service_address=True)
    baseline = snapshot()
    state.run_dir().mkdir(parents=True, exist_ok=True)
    _baseline_file().write_text(json.dumps(baseline, indent=2))
    add_address(SERVICE_ADDRESS)


def add_address(address: str) -> None:
    result = subprocess.run(
        ["ip", "addr", "add", f"{address}/32", "dev", "lo"], capture_output=True, text=True
    )
    if result.returncode != 0 and not any(
        known in result.stderr for known in ("File exists", "already assigned")
    ):
        raise RuntimeError(f"adding {address} to lo failed: {result.stderr}")


def remove_address(address: str) -> None:
    subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], capture_output=True)


def cluster_running() -> bool:
    """Whether a cluster with real nodes has changed the host and not yet restored it."""
    return _baseline_file().exists()


def _suite_addresses() -> list[str]:
    return [cidr for cidr in _lo_addresses() if cidr.startswith(f"{SUITE_PREFIX}.")]


def _our_processes() -> list[int]:
    """Processes of the test nodes: kubelets, their containerd and shims (found by their
    arguments naming a node folder) and everything in the nodes' cgroups."""
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if any(NODE_ROOT_MARKER.encode() in arg for arg in argv):
                pids.add(int(entry.name))
    pids |= set(_cgroup_tasks())
    pids.discard(os.getpid())
    return sorted(pids)


def _cgroup_dirs() -> list[Path]:
    """Every cgroup folder of the test nodes, deepest first."""
    found: list[Path] = []
    if not CGROUP_FS.is_dir():
        return found
    for controller in CGROUP_FS.iterdir():
        if controller.is_symlink() or not controller.is_dir():
            continue
        for top in controller.glob(f"{CGROUP_PREFIX}*"):
            found += [Path(d) for d, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _cgroup_tasks() -> list[int]:
    tasks: set[int] = set()
    for folder in _cgroup_dirs():
        with contextlib.suppress(OSError):
            tasks |= {int(t) for t in (folder / "cgroup.procs").read_text().split()}
    return sorted(tasks)


def kill_tree(pids_of: Any, freezer: Path | None = None) -> None:
    """SIGKILL the processes ``pids_of()`` returns until none is left (bounded), with the
    freezer cgroup frozen meanwhile so nothing forks away."""
    frozen = False
    if freezer is not None and (freezer / "freezer.state").exists():
        with contextlib.suppress(OSError):
            (freezer / "freezer.state").write_text("FROZEN")
            frozen = True
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pids = pids_of()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if frozen:
                with contextlib.suppress(OSError):
                    (freezer / "freezer.state").write_text("THAWED")  # type: ignore[operator]
                frozen = False
            time.sleep(0.1)
    finally:
        if frozen:
            with contextlib.suppress(OSError):
                (freezer / "freezer.state").write_text("THAWED")  # type: ignore[operator]


def remove_cgroups(dirs: list[Path]) -> None:
    for folder in dirs:
        for _ in range(20):
            try:
                folder.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def mounts_under(markers: tuple[str, ...]) -> list[str]:
    """Mount points whose path contains one of ``markers``, deepest first."""
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if any(marker in point for marker in markers):
                points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount(points: list[str]) -> None:
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True)


def restore(*, keep_service_address: bool = False) -> None:
    """Put the host back as ``prepare()`` found it (a no-op when nothing is recorded and
    nothing is left over). Safe to call more than once. ``keep_service_address``: leave
    the suite's service address on ``lo`` (stores of this run may listen on it)."""
    baseline_path = _baseline_file()
    try:
        baseline: dict[str, Any] | None = json.loads(baseline_path.read_text())
    except (OSError, ValueError):
        baseline = None
    kill_tree(_our_processes)
    unmount(mounts_under((NODE_ROOT_MARKER,)))
    remove_cgroups(_cgroup_dirs())
    netns_before = set(baseline["netns"]) if baseline else set()
    for name in _netns():
        if name.startswith("cni-") and name not in netns_before:
            subprocess.run(["umount", "-l", f"/run/netns/{name}"], capture_output=True)
            with contextlib.suppress(OSError):
                os.unlink(f"/run/netns/{name}")
    links_before = set(baseline["links"]) if baseline else set()
    for name in _link_names():
        # Pods' host-side veths (their namespaces may outlive a killed node) and bridges.
        if name.startswith(BRIDGE_PREFIX) or (
            name.startswith("veth") and baseline is not None and name not in links_before
        ):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    # A namespace is destroyed asynchronously once unmounted; its veth goes with it.
    deadline = time.monotonic() + 10
    while baseline is not None and time.monotonic() < deadline:
        if not [n for n in _link_names() if n.startswith("veth") and n not in links_before]:
            break
        time.sleep(0.2)
    for cidr in _suite_addresses():
        if keep_service_address and cidr == f"{SERVICE_ADDRESS}/32":
            continue
        subprocess.run(["ip", "addr", "del", cidr, "dev", "lo"], capture_output=True)
    if baseline is None:
        return
    for table, before in _iptables_chains().items():
        known = set(baseline["iptables"].get(table, []))
        for chain in before:
            if chain in KUBE_CHAINS and chain not in known:
                _drop_chain(table, chain)
    for path, existed in baseline["paths"].items():
        if not existed and os.path.lexists(path):
            unmount(mounts_under((path + "/",)))
            shutil.rmtree(path, ignore_errors=True)
    for name, value in baseline["sysctls"].items():
        with contextlib.suppress(OSError):
            _sysctl_path(name).write_text(value)
    baseline_path.unlink(missing_ok=True)


def _drop_chain(table: str, chain: str) -> None:
    rules = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True).stdout
    for rule in rules.splitlines():
        parts = rule.split()
        if parts[:1] == ["-A"] and chain in parts[2:]:
            subprocess.run(["iptables", "-t", table, "-D", *parts[1:]], capture_output=True)
    subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True)
    subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True)
