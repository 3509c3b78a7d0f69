"""The test cluster with real nodes: start-up time, pod start latency, memory.

``python -m benchmarks nodes`` starts a cluster with real kubelets (two CPU nodes and a
GPU node), then measures: how long ``Cluster.start()`` takes (control plane, registry
with the suite's images, three nodes, images pre-pulled), the time from creating a pod to
its ``Running`` status for one pod at a time (p50 of 5) and for 20 pods created at once
(p50 and slowest of the 20), and the resident memory of every process of the cluster
(control plane, kubelets, containerd, shims and pause containers) with and without the
20 pods. Results: ``benchmarks/results/nodes.{json,md}``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import _report
from tests.cluster.cluster import NAMESPACE, Cluster


def _rss_mib(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _cluster_pids(cluster: Cluster) -> set[int]:
    pids: set[int] = set()
    for node in cluster.nodes.values():
        pids |= set(node.tasks())  # type: ignore[union-attr]
    cp = cluster.control_plane
    for process in (cp.etcd, cp.apiserver, cp.controller_manager, cp.scheduler):
        if process.popen is not None:
            pids.add(process.popen.pid)
    return pids


def _pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "nodes"}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11-slim",
                    "command": ["python", "-c", "import time; time.sleep(600)"],
                }
            ],
        },
    }


def _start_pods(cluster: Cluster, names: list[str]) -> list[float]:
    """Create the pods at once; seconds from creation to Running, per pod."""
    manifest = cluster.data_dir / "bench-pods.json"
    items = [_pod(n) for n in names]
    manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    started = time.monotonic()
    cluster.control_plane.kubectl("apply", "-n", NAMESPACE, "-f", str(manifest))
    running: dict[str, float] = {}
    while len(running) < len(names) and time.monotonic() - started < 300:
        out = cluster.control_plane.kubectl(
            "get", "pods", "-n", NAMESPACE, "-l", "bench=nodes", "-o", "json"
        )
        for pod in json.loads(out.stdout)["items"]:
            name = pod["metadata"]["name"]
            if name not in running and pod["status"].get("phase") == "Running":
                running[name] = time.monotonic() - started
        time.sleep(0.05)
    if len(running) < len(names):
        raise RuntimeError(f"only {len(running)} of {len(names)} pods ran within 300 s")
    return list(running.values())


def _delete_pods(cluster: Cluster) -> None:
    cluster.control_plane.kubectl(
        "delete", "pods", "-n", NAMESPACE, "-l", "bench=nodes", "--wait=true", "--timeout=120s"
    )


def main() -> None:
    started = time.monotonic()
    cluster = Cluster()
    cluster.start()
    up = time.monotonic() - started
    try:
        idle = _rss_mib(_cluster_pids(cluster))
        singles = []
        for i in range(5):
            singles += _start_pods(cluster, [f"single-{i}"])
            _delete_pods(cluster)
        twenty = _start_pods(cluster, [f"many-{i}" for i in range(20)])
        busy = _rss_mib(_cluster_pids(cluster))
        _delete_pods(cluster)
    finally:
        cluster.stop()
    figures = {
        "cluster_up_s": round(up, 1),
        "pod_running_p50_s_1": round(statistics.median(singles), 2),
        "pod_running_p50_s_20": round(statistics.median(twenty), 2),
        "pod_running_max_s_20": round(max(twenty), 2),
        "cluster_rss_mib_idle": round(idle),
        "cluster_rss_mib_20_pods": round(busy),
    }
    _report.write(
        "nodes",
        figures,
        [
            (
                "cluster up (control plane, registry, 3 real nodes, images pulled)",
                f"{up:.0f} s",
                "—",
            ),
            (
                "pod created → Running, one at a time (p50 of 5)",
                f"{figures['pod_running_p50_s_1']} s",
                "—",
            ),
            (
                "20 pods created at once → Running (p50 / slowest)",
                f"{figures['pod_running_p50_s_20']} s / {figures['pod_running_max_s_20']} s",
                "—",
            ),
            ("memory of the running cluster, idle (RSS)", f"{idle:.0f} MiB", "—"),
            ("memory with 20 pods running (RSS)", f"{busy:.0f} MiB", "—"),
        ],
    )


if __name__ == "__main__":
    main()
