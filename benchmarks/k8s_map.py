"""A map on the test cluster as one Indexed Job, against the same calls as one Job each.

Storage is S3 (moto's server, a real HTTP object store). For a map of ``N`` trivial
items (one item per pod), and for the same ``N`` items submitted as ``N`` calls in the
same run:

- wall time from submission to the last result;
- Kubernetes API requests the client made (its own count of every request it sent), and
  the API server's count of Job creations (``apiserver_request_total``);
- the most watch and log-stream connections open at once in the test namespace, from the
  API server's ``apiserver_longrunning_requests`` gauge, for 10 and for ``N`` items;
- storage requests per item, client and pods together, from the store's request log.

Then: client RSS growth while 10,000 items are pending, and bytes uploaded for a
100-item map sharing one 100 MB argument.
"""

from __future__ import annotations

import gc
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

import ascend
from ascend import _scheduler
from ascend.backends._kubernetes._spec import default_image
from benchmarks._k8s import client_api_requests, metric
from benchmarks._report import write
from tests.cluster.shared import Shared

ITEMS = int(os.environ.get("ASCEND_BENCH_MAP_ITEMS", "1000"))
PENDING = 10_000
SHARED_MB = 100
SHARED_ITEMS = 100

# A request line of the store's log, perhaps coloured (ANSI codes around the method).
_REQUEST_LINE = re.compile(r'"(?:\x1b\[[\d;]*m)*(GET|PUT|POST|DELETE|HEAD) [^"]* HTTP/1\.[01]')


# A CPU request, as real workloads have: the scheduler then runs 40 pods at a time on the
# test cluster's two CPU nodes instead of 220 processes fighting over this machine's cores.
POD_CPU = "200m"


@ascend.remote(cpu=POD_CPU)
def square(x: int) -> int:
    return x * x


def gated_by(gate: Shared) -> Any:
    """A function that waits for ``gate`` (in the store: a pod sees no host folder). The
    gate is in the function, pickled once per map, so the items are plain ints and the
    RSS figure is ascend's per-item cost, not the pickled size of a test-suite object
    (whose class travels by value: 8.6 KB per item)."""

    def gated(i: int) -> int:
        gate.wait("gate", interval=0.5)
        return i

    return ascend.remote(cpu=POD_CPU)(gated)


@ascend.remote(cpu=POD_CPU)
def size(i: int, shared: bytes) -> int:
    return i + len(shared)


def _streams(text: str) -> float:
    """Open watches and log streams in namespaces (the client's: controllers and
    kubelets watch cluster-wide)."""
    return sum(
        metric(text, "apiserver_longrunning_requests", 'scope="namespace"', f'resource="{r}"')
        for r in ("jobs", "pods", "events")
    )


def _job_creations(text: str) -> float:
    return metric(text, "apiserver_request_total", 'verb="POST"', 'resource="jobs"')


def _storage_stats() -> dict[str, int]:
    total: dict[str, int] = {}
    for storage in _scheduler.get_scheduler()._storages.values():
        for k, v in storage.stats.items():
            total[k] = total.get(k, 0) + v
    return total


class _Peak:
    """Samples a value in a thread; ``peak`` is the largest seen."""

    def __init__(self, sample: Callable[[], float], interval: float) -> None:
        self._sample, self._interval = sample, interval
        self.peak = 0.0
        self.missed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._sample())
            except OSError:  # a loaded API server may answer /metrics late: next time
                self.missed += 1
            self._stop.wait(self._interval)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


@contextmanager
def _counted(metrics: Callable[[], str], store_log: Path) -> Iterator[dict[str, float]]:
    """Counts what happens inside the block: wall time, API and storage requests, streams."""
    out: dict[str, float] = {}
    api0, text0 = client_api_requests(), metrics()
    log0 = store_log.stat().st_size
    start = time.perf_counter()
    with _Peak(lambda: _streams(metrics()), 1.0) as streams:
        yield out
    out["wall_seconds"] = time.perf_counter() - start
    time.sleep(1)  # the last requests reach the store's log
    text1 = metrics()
    with store_log.open("rb") as log:
        log.seek(log0)
        out["storage_requests"] = len(_REQUEST_LINE.findall(log.read().decode(errors="replace")))
    out["client_api_requests"] = client_api_requests() - api0
    out["apiserver_job_creations"] = _job_creations(text1) - _job_creations(text0)
    out["peak_open_streams"] = streams.peak
    out["stream_samples_missed"] = streams.missed


def _rss() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    from tests.cluster import hostenv
    from tests.cluster.cluster import Cluster
    from tests.cluster.stores import start_s3

    # Hundreds of pods starting on a small machine can starve a kubelet's heartbeat for
    # more than the test cluster's short default grace: allow what Kubernetes does.
    with tempfile.TemporaryDirectory() as tmp, Cluster(node_grace="50s") as cluster:
        workdir = Path(tmp)
        os.environ["XDG_CONFIG_HOME"] = str(workdir / "config")
        # A store of its own (its request log counts this benchmark's requests only), on
        # the address pods reach.
        store = start_s3(workdir, host=hostenv.SERVICE_ADDRESS)
        try:
            figures = _measure(cluster, store, workdir)
        finally:
            store.stop()
    report(figures)


def _measure(cluster: Any, store: Any, workdir: Path) -> dict[str, Any]:
    store.activate()
    secret = "bench-s3"
    cluster.control_plane.kubectl(
        "create",
        "secret",
        "generic",
        secret,
        "-n",
        cluster.namespace,
        *(f"--from-literal={k}={v}" for k, v in store.env.items()),
    )
    ascend.configure(
        backend="kubernetes",
        kubeconfig=str(cluster.kubeconfig),
        namespace=cluster.namespace,
        storage=f"{store.url}/bench",
        storage_options=store.storage_options,
        storage_secret=secret,
        stream_logs=False,
        progress=False,
        image=default_image(),  # the suite's runner image, as the e2e tests use
        # Hundreds of calls wait for CPU on two small nodes: busy, not impossible.
        unschedulable_grace=3600,
    )
    metrics = cluster.control_plane.metrics
    store_log = workdir / "moto.log"
    square(0).result(timeout=120)  # connect, open the watches, create the signing Secret
    figures: dict[str, Any] = {"items": ITEMS}

    with _counted(metrics, store_log) as small:
        assert square.map(range(10)).result(timeout=600) == [x * x for x in range(10)]
    with _counted(metrics, store_log) as mapped:
        assert square.map(range(ITEMS)).result(timeout=3600) == [x * x for x in range(ITEMS)]
    with _counted(metrics, store_log) as calls:
        futures = [square(x) for x in range(ITEMS)]
        assert ascend.gather(*futures).result(timeout=3600) == [x * x for x in range(ITEMS)]
    figures.update(map_10=small, map=mapped, calls=calls)

    # Pending items: a map that cannot progress (two pods at a time, each waiting).
    gate = Shared(f"{store.url}/gates", store.storage_options)
    before = _rss()
    with _Peak(lambda: psutil.Process().memory_info().rss / 2**20, 0.1) as rss:
        pending = gated_by(gate).map(range(PENDING), max_parallel=2)
        deadline = time.monotonic() + 900
        while not any(f._status == "running" for f in pending.futures[:2]):
            if time.monotonic() > deadline:
                raise TimeoutError("the pending map never started")
            time.sleep(0.5)
    figures["pending_rss_growth_mb"] = rss.peak - before
    pending.cancel()
    gate.touch("gate")

    written0 = _storage_stats().get("bytes_written", 0)
    shared = os.urandom(SHARED_MB * 2**20)
    results = size.map(range(SHARED_ITEMS), [shared] * SHARED_ITEMS, chunksize=10)
    assert results.result(timeout=1800) == [i + len(shared) for i in range(SHARED_ITEMS)]
    figures["shared_arg_bytes_uploaded_mb"] = (
        _storage_stats().get("bytes_written", 0) - written0
    ) / 2**20
    return figures


def report(figures: dict[str, Any]) -> None:
    """The table for the README (``figures`` as saved in ``results/map.json``)."""
    n = figures["items"]
    mapped, calls, small = figures["map"], figures["calls"], figures["map_10"]
    table = [
        (
            f"wall time, {n}-item map vs {n} calls (one Job each)",
            f"{mapped['wall_seconds']:.0f} s vs {calls['wall_seconds']:.0f} s "
            f"({n / mapped['wall_seconds']:.1f} vs {n / calls['wall_seconds']:.1f} pods/s)",
            "bounded by pod starts, not the client",
        ),
        (
            f"client Kubernetes API requests: 10-item map ({small['wall_seconds']:.0f} s), "
            f"{n}-item map ({mapped['wall_seconds']:.0f} s), per call",
            f"{small['client_api_requests']:.0f}, {mapped['client_api_requests']:.0f}, "
            f"{calls['client_api_requests'] / n:.1f}",
            "per map: 1 Job creation, plus the process's session upkeep (a lease renewal "
            "every 20 s, a reaper list every 30 s), whatever its size; ≥ 2 per call",
        ),
        (
            "Jobs created (apiserver_request_total), map vs calls",
            f"{mapped['apiserver_job_creations']:.0f} vs {calls['apiserver_job_creations']:.0f}",
            "1 vs N",
        ),
        (
            f"open watches and log streams, 10-item vs {n}-item map",
            f"{small['peak_open_streams']:.0f} vs {mapped['peak_open_streams']:.0f}",
            "constant, ≤ 4",
        ),
        (
            "storage requests per item (client and pods), map vs calls",
            f"{mapped['storage_requests'] / n:.2f} vs {calls['storage_requests'] / n:.2f}",
            "≤ 3",
        ),
        (
            f"client RSS growth with {PENDING:,} items pending",
            f"{figures['pending_rss_growth_mb']:.0f} MB",
            "< 50 MB",
        ),
        (
            f"bytes uploaded, {SHARED_ITEMS}-item map sharing one {SHARED_MB} MB argument",
            f"{figures['shared_arg_bytes_uploaded_mb']:.1f} MB",
            f"≈ {SHARED_MB} MB",
        ),
    ]
    write("map", figures, table)


if __name__ == "__main__":
    main()
