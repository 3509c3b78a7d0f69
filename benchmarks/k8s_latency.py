"""One call on the test cluster, phase by phase, against a bare Job in the same run.

Phases of ``add(1, 2).result()`` with the Kubernetes backend:
serialize (pickling, in the caller), upload (package + meta), Job create (the POST),
schedule + process start (until the function's first line runs), run, and from the
function's end until the result is back (Job completion seen through the watch, result
download). The baseline is the same Job round trip without ascend: a bare Job running
``python -c "import cloudpickle"``, created and watched until Complete.

Also: API requests the client makes per call, and open WATCH connections (from the
apiserver's own ``apiserver_longrunning_requests`` gauge) with 1 and with ``IN_FLIGHT``
calls in flight.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

import ascend
from ascend import _scheduler
from ascend.backends._kubernetes import _client
from ascend.backends._kubernetes._spec import default_image
from benchmarks._k8s import client_api_requests, metric
from benchmarks._report import write
from tests.cluster.shared import Shared

REPEAT = 10
# Calls held running at once: each is a pod on the test cluster's real nodes (a Python
# process polling a gate), which this 2-core machine runs by the dozen, not by the hundred.
IN_FLIGHT = int(os.environ.get("ASCEND_BENCH_IN_FLIGHT", "50"))


def _watches(metrics: str) -> float:
    """Open WATCH requests on namespaced jobs and pods (all clients), from the gauge."""
    return sum(
        metric(
            metrics,
            "apiserver_longrunning_requests",
            'verb="WATCH"',
            'scope="namespace"',
            f'resource="{resource}"',
        )
        for resource in ("jobs", "pods")
    )


def _timed(phases: dict[str, list[float]]) -> None:
    """Record phase end times by wrapping the scheduler's and client's steps."""
    upload = _scheduler._JobRun._upload
    request = _client.Api.request

    async def timed_upload(self: Any, storage: Any) -> None:
        await upload(self, storage)
        phases["uploaded"].append(time.perf_counter())

    async def timed_request(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        result = await request(self, method, path, **kwargs)
        if method == "POST" and path.endswith("/jobs"):
            phases["created"].append(time.perf_counter())
        return result

    _scheduler._JobRun._upload = timed_upload  # type: ignore[method-assign]
    _client.Api.request = timed_request  # type: ignore[method-assign]


@ascend.remote
def add(a: int, b: int) -> tuple[int, float, float]:
    started = time.time()
    return a + b, started, time.time()


@ascend.remote
def gated(gate: Shared) -> int:
    gate.wait("gate", interval=0.5)  # in the store: a pod sees no host folder
    return 1


async def _bare_job(kubeconfig: str, namespace: str, name: str) -> None:
    from kubernetes_asyncio import client, config, watch

    configuration = client.Configuration()
    await config.load_kube_config(kubeconfig, client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        batch = client.BatchV1Api(api)
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "c",
                                "image": default_image(),  # what the calls run on
                                "command": ["python", "-c", "import cloudpickle"],
                            }
                        ],
                    }
                },
            },
        }
        created = await batch.create_namespaced_job(namespace, job)
        async with watch.Watch().stream(
            batch.list_namespaced_job,
            namespace,
            field_selector=f"metadata.name={name}",
            resource_version=created.metadata.resource_version,
            timeout_seconds=120,
        ) as stream:
            async for event in stream:
                if any(
                    c.type == "Complete" and c.status == "True"
                    for c in event["object"].status.conditions or []
                ):
                    return


def main() -> None:
    from tests.cluster.cluster import Cluster

    with tempfile.TemporaryDirectory() as tmp, Cluster() as cluster:
        os.environ["XDG_CONFIG_HOME"] = os.path.join(tmp, "config")
        ascend.configure(
            backend="kubernetes",
            kubeconfig=str(cluster.kubeconfig),
            namespace=cluster.namespace,
            stream_logs=False,
            image=default_image(),  # the runner image, as the bare Job below
            **cluster.storage_settings(),  # S3 that pods reach
        )
        phases: dict[str, list[float]] = {"uploaded": [], "created": []}
        _timed(phases)
        add(0, 0).result(timeout=120)  # connect, open the watches, create the signing Secret

        rows: list[dict[str, float]] = []
        api_before = client_api_requests()
        for _ in range(REPEAT):
            phases["uploaded"].clear()
            phases["created"].clear()
            t0 = time.perf_counter()
            wall0 = time.time()
            fut = add(1, 2)
            t_submitted = time.perf_counter()
            _value, started, ended = fut.result(timeout=120)
            t_done = time.perf_counter()
            offset = wall0 - t0  # perf_counter -> wall clock
            rows.append(
                {
                    "serialize": t_submitted - t0,
                    "upload": phases["uploaded"][0] - t_submitted,
                    "job_create": phases["created"][0] - phases["uploaded"][0],
                    "schedule_and_process_start": (started - offset) - phases["created"][0],
                    "run": ended - started,
                    "completion_and_result": t_done - (ended - offset),
                    "total": t_done - t0,
                }
            )
        api_per_call = (client_api_requests() - api_before) / REPEAT

        bare = []
        for i in range(REPEAT):
            start = time.perf_counter()
            asyncio.run(_bare_job(str(cluster.kubeconfig), cluster.namespace, f"bare-{i}"))
            bare.append(time.perf_counter() - start)

        metrics = cluster.control_plane.metrics
        settings = cluster.storage_settings()
        gate = Shared(settings["storage"], settings["storage_options"])
        one = gated(gate)
        time.sleep(3)  # the first call is running; its watches are open
        watches_one = _watches(metrics())
        many = [gated(gate) for _ in range(IN_FLIGHT - 1)]
        time.sleep(5)
        watches_many = _watches(metrics())
        gate.touch("gate")
        ascend.wait([one, *many], timeout=900)

    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    client_share = median["serialize"] + median["upload"] + median["job_create"]
    figures = {
        "median_seconds": median,
        "client_share_seconds": client_share,
        "bare_job_round_trip_seconds": statistics.median(bare),
        "ascend_vs_bare_job": median["total"] / statistics.median(bare),
        "client_api_requests_per_call": api_per_call,
        "watch_connections_1_in_flight": watches_one,
        f"watch_connections_{IN_FLIGHT}_in_flight": watches_many,
    }
    ms = {k: f"{v * 1e3:.0f} ms" for k, v in median.items()}
    table = [
        (
            "one call, end to end / bare Job round trip (same cluster, same run)",
            f"{figures['ascend_vs_bare_job']:.2f}× ({ms['total']} vs {statistics.median(bare) * 1e3:.0f} ms)",
            "≤ 1×",
        ),
        (
            "phases: serialize / upload / Job create",
            f"{ms['serialize']} / {ms['upload']} / {ms['job_create']}",
            "the client's share: minimise",
        ),
        (
            "phases: schedule + process start / run / completion seen + result",
            f"{ms['schedule_and_process_start']} / {ms['run']} / {ms['completion_and_result']}",
            "cluster-bound",
        ),
        ("client API requests per call", f"{api_per_call:.1f}", "few"),
        (
            f"open WATCH connections on jobs and pods, 1 vs {IN_FLIGHT} calls in flight",
            f"{watches_one:.0f} vs {watches_many:.0f}",
            "constant",
        ),
    ]
    write("kubernetes", figures, table)


if __name__ == "__main__":
    main()
