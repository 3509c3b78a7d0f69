"""The Kubernetes backend end to end, on the real test cluster with real storage."""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from pathlib import Path

import fsspec
import pytest

import ascend
from tests.cluster.fixtures_k8s import K8sCluster, wait_until
from tests.cluster.k8s_helpers import jobs_of as _jobs
from tests.cluster.k8s_helpers import pods_of as _pods
from tests.cluster.shared import Shared
from tests.cluster.stores import Store

pytestmark = pytest.mark.k8s


def _submit_from_another_process(tmp_path: Path, body: str, *, detach: bool) -> str:
    """Run a script that submits one call with the current settings and exits; returns
    the call's job id (the script prints it last)."""
    import subprocess
    import sys
    import textwrap

    settings = ascend.configure()
    script = tmp_path / "client.py"
    header = textwrap.dedent(f"""
        import os, time
        import ascend
        ascend.configure(backend="kubernetes", kubeconfig={settings.kubeconfig!r},
                         namespace={settings.namespace!r}, storage={settings.storage!r},
                         storage_options={dict(settings.storage_options)!r},
                         storage_secret={settings.storage_secret!r}, image={settings.image!r},
                         detach={detach}, stream_logs=False)

        def exists(url, options):  # a gate in the folder the test shares with the pods
            import fsspec
            fs = fsspec.filesystem(url.split("://")[0], skip_instance_cache=True, **options)
            return fs.exists(url.split("://", 1)[1])
    """)
    script.write_text(header + textwrap.dedent(body))
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


@ascend.remote
def add(a: int, b: int) -> int:
    print(f"adding {a} and {b}", flush=True)
    return a + b


@ascend.remote
def raises() -> None:
    raise LookupError("missing remotely")


@ascend.remote
def sleeper(seconds: float) -> str:
    print(os.getpid(), flush=True)
    time.sleep(seconds)
    return "woke"


def test_a_call_runs_as_a_job_and_returns_its_value(on_cluster: K8sCluster) -> None:
    fut = add(2, 3)
    assert fut.result(timeout=120) == 5
    assert list(fut.logs()) == ["adding 2 and 3"]
    job = _jobs(on_cluster, fut.job_id)[0]
    pod_spec = job["spec"]["template"]["spec"]
    assert job["spec"]["backoffLimit"] == 0
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e for e in pod_spec["containers"][0]["env"]}
    assert "secretKeyRef" in env["ASCEND_SIGNING_KEY"]["valueFrom"], (
        "the key never appears as a plain value"
    )
    # A copy of the pod's output stays in the job's folder after the pod is gone.
    settings = ascend.configure()
    fs, root = fsspec.core.url_to_fs(settings.user_prefix, **settings.storage_options)
    copies = fs.glob(f"{root}/jobs/{fut.job_id}/logs/*.log")
    assert len(copies) == 1 and "adding 2 and 3" in fs.cat_file(copies[0]).decode()


def test_remote_exception_keeps_its_type(on_cluster: K8sCluster) -> None:
    with pytest.raises(LookupError, match="missing remotely") as info:
        raises().result(timeout=120)
    assert "raises" in str(info.value.__cause__)


def test_output_streams_while_the_call_runs(on_cluster: K8sCluster, shared: Shared) -> None:
    @ascend.remote
    def waits(gate: Shared) -> str:
        print("waiting for the gate", flush=True)
        gate.wait("gate")
        return "through"

    fut = waits(shared)
    assert next(iter(fut.logs())) == "waiting for the gate"
    assert not fut.done()
    shared.touch("gate")
    assert fut.result(timeout=120) == "through"


def test_cancel_deletes_the_job_and_stops_the_pod(on_cluster: K8sCluster) -> None:
    fut = sleeper(600)
    next(iter(fut.logs()))
    assert fut.cancel()
    wait_until(lambda: not _pods(on_cluster, fut.job_id), 60, "the pod to stop")
    wait_until(lambda: not _jobs(on_cluster, fut.job_id), 60, "the Job to be deleted")


def test_timeout_ends_as_deadline_exceeded(on_cluster: K8sCluster) -> None:
    with pytest.raises(ascend.DeadlineExceeded, match="timeout of 2 s"):
        sleeper.options(timeout=2)(600).result(timeout=120)


def test_gpu_call_runs_on_the_gpu_node(on_cluster: K8sCluster) -> None:
    @ascend.remote(gpu=1)
    def node() -> str:
        return os.environ.get("HOSTNAME", "")

    fut = node()
    fut.result(timeout=120)
    assert _pods(on_cluster, fut.job_id)[0]["spec"]["nodeName"] == "gpu-1"


def test_too_many_gpus_fail_before_a_job_exists(on_cluster: K8sCluster) -> None:
    fut = add.options(gpu=8)(1, 1)
    with pytest.raises(ascend.Unschedulable, match="no node of the cluster has 8 GPUs"):
        fut.result(timeout=60)
    assert not _jobs(on_cluster, fut.job_id)


def test_a_request_that_fits_a_busy_node_waits_then_is_unschedulable(
    on_cluster: K8sCluster,
) -> None:
    ascend.configure(unschedulable_grace=60)  # earlier tests' pods may still be stopping
    holder = sleeper.options(gpu=2)(600)
    next(iter(holder.logs()))  # both GPUs of the GPU node are taken
    ascend.configure(unschedulable_grace=2)
    try:
        fut = add.options(gpu=1)(1, 1)
        with pytest.raises(ascend.Unschedulable, match="Insufficient nvidia.com/gpu"):
            fut.result(timeout=60)
        wait_until(lambda: not _jobs(on_cluster, fut.job_id), 60, "the Job to be deleted")
    finally:
        holder.cancel()


def test_memory_hog_is_reported_as_oom(on_cluster: K8sCluster) -> None:
    @ascend.remote(memory="150Mi")
    def hog() -> int:
        block = bytearray(600 * 2**20)
        time.sleep(30)
        return len(block)

    with pytest.raises(ascend.OOMKilled, match="150Mi"):
        hog().result(timeout=120)


def test_unknown_image_is_an_image_pull_error(on_cluster: K8sCluster) -> None:
    with pytest.raises(ascend.ImagePullError, match="registry.invalid/none:1"):
        add.options(image="registry.invalid/none:1")(1, 1).result(timeout=120)


def test_unprivileged_user_gets_a_clear_permission_error(on_cluster: K8sCluster) -> None:
    if on_cluster.unprivileged_kubeconfig is None:
        pytest.skip("the kind cluster has no unprivileged test user")
    ascend.configure(kubeconfig=str(on_cluster.unprivileged_kubeconfig))
    with pytest.raises(ascend.PermissionDenied, match="Fix: ask a cluster admin"):
        add(1, 1).result(timeout=60)


@pytest.mark.stores
def test_round_trip_through_each_cloud_store(
    on_cluster: K8sCluster, cloud_store: Store, store_prefix: str
) -> None:
    secret = f"store-{cloud_store.name}"
    args = [f"--from-literal={k}={v}" for k, v in cloud_store.env.items()]
    on_cluster.kubectl(
        "create", "secret", "generic", secret, "-n", on_cluster.namespace, *args, check=False
    )
    ascend.configure(
        storage=store_prefix, storage_options=cloud_store.storage_options, storage_secret=secret
    )
    fut = add(20, 22)
    assert fut.result(timeout=120) == 42
    fs = cloud_store.filesystem()
    assert fs.exists(
        f"{store_prefix}/projects/default/users/{ascend.configure().user}/jobs/{fut.job_id}/result.pkl"
    )


@pytest.mark.slow
def test_many_concurrent_calls_share_the_same_watches(on_cluster: K8sCluster) -> None:
    def watches() -> float:
        text = on_cluster.control_plane.metrics() if on_cluster.control_plane else ""
        total = 0.0
        for line in text.splitlines():
            if (
                line.startswith("apiserver_longrunning_requests{")
                and 'verb="WATCH"' in line
                and 'scope="namespace"' in line
                and ('resource="jobs"' in line or 'resource="pods"' in line)
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total

    if on_cluster.control_plane is None:
        pytest.skip("reads the test cluster's apiserver metrics")
    add(0, 0).result(timeout=120)  # the shared watches are open from here on
    with_one = watches()
    futures = [add(i, 1) for i in range(100)]
    during = watches()
    assert [f.result(timeout=600) for f in futures] == [i + 1 for i in range(100)]
    assert during <= with_one, f"watches grew with the number of calls: {with_one} -> {during}"
    assert concurrent.futures.wait(futures).not_done == set()


@pytest.mark.slow
def test_a_lost_node_fails_a_call_that_allows_no_preemption(on_cluster: K8sCluster) -> None:
    cluster = on_cluster.require_own_cluster("stopping a node")
    fut = sleeper.options(node_type="gpu-standard", gpu=1, max_preemptions=0)(600)
    int(next(iter(fut.logs())))
    node = cluster.nodes["gpu-1"]
    node.stop()
    try:
        with pytest.raises(ascend.Preempted, match="taken off its node"):
            fut.result(timeout=120)
    finally:
        node.start()
        node.wait_ready()
    wait_until(lambda: not _jobs(on_cluster, fut.job_id), 60, "the Job to be deleted")


@pytest.mark.slow
def test_apiserver_restart_during_calls_loses_nothing_and_resolves_nothing_twice(
    on_cluster: K8sCluster, shared: Shared
) -> None:
    cluster = on_cluster.require_own_cluster("restarting kube-apiserver")

    @ascend.remote
    def gated(i: int, gate: Shared) -> int:
        print(f"started {i}", flush=True)
        gate.wait("gate")
        print(f"through {i}", flush=True)
        return i * i

    futures = [gated(i, shared) for i in range(20)]
    for fut in futures:  # every call is running before the restart
        next(iter(fut.logs()))
    resolutions: list[int] = []
    for fut in futures:
        fut.add_done_callback(lambda f: resolutions.append(1))
    cluster.control_plane.restart_apiserver()
    shared.touch("gate")
    assert [f.result(timeout=180) for f in futures] == [i * i for i in range(20)]
    # Done callbacks run off the scheduler's loop: the last may come just after result().
    wait_until(lambda: len(resolutions) >= 20, 30, "every done callback")
    time.sleep(1)  # a second resolution would come now
    assert len(resolutions) == 20
    # Log streams broken by the restart resumed without losing or repeating a line.
    assert [list(f.logs()) for f in futures] == [
        [f"started {i}", f"through {i}"] for i in range(20)
    ]


def test_a_second_process_reattaches_to_a_running_call(
    on_cluster: K8sCluster, tmp_path: Path, shared: Shared
) -> None:
    job_id = _submit_from_another_process(
        tmp_path,
        f"""
        @ascend.remote
        def gated(url, options):
            print("running", flush=True)
            while not exists(url, options):
                time.sleep(0.1)
            return "finished after re-attach"

        fut = gated({shared.path("gate")!r}, {shared.options!r})
        next(iter(fut.logs()))
        print(fut.job_id, flush=True)
        """,
        detach=True,
    )
    assert _jobs(on_cluster, job_id), (
        "detach=True left the Job running after the first process exited"
    )
    fut = ascend.Future.attach(job_id)
    assert not fut.done()
    shared.touch("gate")
    assert fut.result(timeout=120) == "finished after re-attach"


def test_a_pod_refused_by_quota_is_reported_without_waiting_for_the_deadline(
    on_cluster: K8sCluster, tmp_path: Path
) -> None:
    namespace = "ascend-e2e-quota"
    quota = tmp_path / "quota.json"
    quota.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                    {
                        "apiVersion": "v1",
                        "kind": "ResourceQuota",
                        "metadata": {"name": "no-pods", "namespace": namespace},
                        "spec": {"hard": {"pods": "0"}},
                    },
                ],
            }
        )
    )
    on_cluster.kubectl("apply", "-f", str(quota))
    on_cluster.kubectl(
        "wait", "--for=create", "serviceaccount/default", "-n", namespace, "--timeout=60s"
    )
    ascend.configure(namespace=namespace)
    with pytest.raises(ascend.WorkerFailed, match="refused to create its pod: .*exceeded quota"):
        add(1, 1).result(timeout=120)


def test_interpreter_exit_deletes_the_jobs_of_pending_calls(
    on_cluster: K8sCluster, tmp_path: Path
) -> None:
    job_id = _submit_from_another_process(
        tmp_path,
        """
        @ascend.remote
        def forever():
            print("running", flush=True)
            time.sleep(600)

        fut = forever()
        next(iter(fut.logs()))
        print(fut.job_id, flush=True)
        """,
        detach=False,
    )
    wait_until(lambda: not _jobs(on_cluster, job_id), 60, "the abandoned call's Job to be deleted")


@pytest.mark.slow
def test_a_lost_node_is_retried_when_retries_allow(on_cluster: K8sCluster, shared: Shared) -> None:
    cluster = on_cluster.require_own_cluster("stopping a node")

    @ascend.remote(gpu=1, retries=1)
    def counted(folder: Shared) -> int:
        folder.append("attempts", "x")
        attempts = len(folder.read_text("attempts"))
        print("running", flush=True)
        if attempts == 1:
            time.sleep(600)  # the first attempt dies with its node
        return attempts

    fut = counted(shared)
    next(iter(fut.logs()))
    node = cluster.nodes["gpu-1"]
    node.stop()
    time.sleep(12)  # the node goes NotReady and its pod is evicted
    node.start()
    node.wait_ready()
    assert fut.result(timeout=180) == 2


@ascend.remote
def grid_point(x: int) -> int:
    if x in (17, 51, 80):
        raise ValueError(f"bad point {x}")
    print(f"point {x}", flush=True)
    return x * x


@pytest.mark.slow
def test_a_100_item_map_is_one_indexed_job_with_failures_in_place(on_cluster: K8sCluster) -> None:
    mf = grid_point.map(range(100), return_exceptions=True)
    results = mf.result(timeout=900)
    assert len(results) == 100
    for x, value in enumerate(results):
        if x in (17, 51, 80):
            assert isinstance(value, ValueError) and str(value) == f"bad point {x}"
        else:
            assert value == x * x
    jobs = _jobs(on_cluster, mf.job_id)
    assert len(jobs) == 1 and jobs[0]["spec"]["completionMode"] == "Indexed"
    assert jobs[0]["spec"]["completions"] == 100
    assert list(mf.futures[5].logs()) == ["point 5"]


@ascend.remote
def fails_or_waits(x: int) -> int:
    if x == 17:
        raise ValueError(f"bad point {x}")
    time.sleep(600)  # still running when item 17 fails: there is work to stop
    return x


def test_a_map_without_return_exceptions_stops_at_the_first_failure(on_cluster: K8sCluster) -> None:
    mf = fails_or_waits.map([1, 2, 17, 3])
    with pytest.raises(ValueError, match="bad point 17"):
        mf.result(timeout=300)
    wait_until(lambda: not _jobs(on_cluster, mf.job_id), 60, "the map's Job to be deleted")


@ascend.remote
def measure(i: int, shared: bytes) -> tuple[int, int]:
    return i, len(shared)


@pytest.mark.stores
def test_a_shared_large_argument_is_uploaded_once_for_a_whole_map(
    on_cluster: K8sCluster, s3_store: Store
) -> None:
    s3_store.activate()
    secret = "store-s3-map"
    args = [f"--from-literal={k}={v}" for k, v in s3_store.env.items()]
    on_cluster.kubectl(
        "create", "secret", "generic", secret, "-n", on_cluster.namespace, *args, check=False
    )
    prefix = f"{s3_store.url}/shared-{os.getpid()}-{time.monotonic_ns()}"
    ascend.configure(
        storage=prefix, storage_options=s3_store.storage_options, storage_secret=secret
    )
    shared = os.urandom(4 * 2**20)
    mf = measure.map(range(30), [shared] * 30, max_parallel=5)
    assert mf.result(timeout=600) == [(i, len(shared)) for i in range(30)]
    again = measure.map(range(3), [shared] * 3)
    assert again.result(timeout=300)[2] == (2, len(shared))

    fs = s3_store.filesystem()
    user = f"{prefix}/projects/default/users/{ascend.configure().user}"
    blobs = fs.find(f"{user}/blobs")
    assert len(blobs) == 1 and fs.size(blobs[0]) == len(shared)
    # The 30 small inputs travel in the package, which only refers to the blob.
    assert not fs.find(f"{user}/jobs/{mf.job_id}/inputs")
    assert fs.size(f"{user}/jobs/{mf.job_id}/package.pkl") < 16384
    (job,) = _jobs(on_cluster, mf.job_id)
    assert job["spec"]["parallelism"] == 5 and job["spec"]["completions"] == 30


def test_cancelling_a_map_deletes_its_job(on_cluster: K8sCluster) -> None:
    mf = sleeper.map([600] * 4)
    int(next(iter(mf.futures[0].logs())))
    assert _jobs(on_cluster, mf.job_id)
    mf.cancel()
    wait_until(lambda: not _jobs(on_cluster, mf.job_id), 60, "the map's Job to be deleted")
    assert all(f.cancelled() for f in mf.futures)


def test_a_second_process_reattaches_to_a_running_map(
    on_cluster: K8sCluster, tmp_path: Path, shared: Shared
) -> None:
    job_id = _submit_from_another_process(
        tmp_path,
        f"""
        @ascend.remote
        def gated(i, url, options):
            print(f"item {{i}} running", flush=True)
            while i % 2 and not exists(url, options):
                time.sleep(0.1)
            return i * 10

        mf = gated.map(range(6), [{shared.path("gate")!r}] * 6, [{shared.options!r}] * 6)
        mf.futures[0].result(timeout=120)
        next(iter(mf.futures[1].logs()))
        print(mf.job_id, flush=True)
        """,
        detach=True,
    )
    assert _jobs(on_cluster, job_id), "detach=True left the map's Job running"
    mf = ascend.MapFuture.attach(job_id)
    assert len(mf.futures) == 6
    assert mf.futures[0].result(timeout=120) == 0  # finished before the attach
    assert not mf.futures[1].done()
    shared.touch("gate")
    assert mf.result(timeout=180) == [i * 10 for i in range(6)]


@pytest.mark.slow
def test_a_lost_node_during_a_map_costs_at_most_a_retry_of_its_items(
    on_cluster: K8sCluster, shared: Shared
) -> None:
    cluster = on_cluster.require_own_cluster("stopping a node")

    @ascend.remote(gpu=1, retries=1)
    def counted(i: int, folder: Shared) -> int:
        folder.append(f"attempts-{i}", "x")
        print("running", flush=True)
        folder.wait("gate")
        return i

    mf = counted.map(range(4), [shared] * 4)
    # The GPU node has two GPUs: two items run on it, the other two wait for them.
    wait_until(lambda: sum(f.status == "running" for f in mf.futures) == 2, 60, "two items")
    node = cluster.nodes["gpu-1"]
    node.stop()
    time.sleep(12)  # the node goes NotReady and its pods are evicted
    node.start()
    node.wait_ready()
    shared.touch("gate")
    assert mf.result(timeout=300) == [0, 1, 2, 3]
    attempts = {i: len(shared.read_text(f"attempts-{i}")) for i in range(4)}
    assert all(n <= 2 for n in attempts.values()), attempts
    assert sum(attempts.values()) <= 6, f"more than the lost items were rerun: {attempts}"


def test_stream_logs_failed_prints_only_failing_items_read_from_storage(
    on_cluster: K8sCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    ascend.configure(stream_logs="failed")
    mf = grid_point.map([16, 17, 18], return_exceptions=True)
    results = mf.result(timeout=300)
    assert results[0] == 256 and isinstance(results[1], ValueError) and results[2] == 324
    out = capsys.readouterr().out
    assert f"[{mf.job_id}#1] failed: ValueError('bad point 17')" in out
    assert "bad point 17" in out and "point 16" not in out and "point 18" not in out
    # Items that succeeded have their output too, read when asked for.
    assert list(mf.futures[2].logs()) == ["point 18"]
