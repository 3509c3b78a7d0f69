"""A client that dies leaves nothing running: its session Lease expires, a reaper deletes
it, and Kubernetes' garbage collector deletes the Jobs it owned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ascend
from tests.cluster.fixtures_k8s import K8sCluster, wait_until
from tests.cluster.k8s_helpers import listed, pods_of
from tests.integration.cli.conftest import ascend_cli

pytestmark = [pytest.mark.k8s, pytest.mark.usefixtures("clean_jobs")]

LEASE = 3.0
REAPER = 1.0
# The garbage collector deletes dependents asynchronously after their owner goes.
GC_SLACK = 30.0


@ascend.remote
def quick() -> int:
    return 1


@pytest.fixture
def on_cluster(on_cluster: K8sCluster) -> K8sCluster:
    """The shared configuration for the test cluster, with this module's settings."""
    ascend.configure(
        session_lease_seconds=LEASE,
        session_reaper_seconds=REAPER,
    )
    return on_cluster


def _start_client(
    tmp_path: Path, *, detach: bool = False, namespace: str | None = None
) -> tuple[subprocess.Popen[str], list[str]]:
    """A client with three running calls; returns it (alive) and their job ids."""
    settings = ascend.configure()
    namespace = namespace or settings.namespace
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(f"""
        import time, ascend
        ascend.configure(backend="kubernetes", kubeconfig={settings.kubeconfig!r},
                         namespace={namespace!r}, storage={settings.storage!r},
                         storage_options={dict(settings.storage_options)!r},
                         storage_secret={settings.storage_secret!r},
                         image={settings.image!r}, session_lease_seconds={LEASE}, session_reaper_seconds={REAPER},
                         stream_logs=False, detach={detach})

        @ascend.remote
        def long(i):
            time.sleep(600)

        futs = [long(i) for i in range(3)]
        deadline = time.monotonic() + 90
        while not all(f.running() for f in futs) and time.monotonic() < deadline:
            time.sleep(0.2)
        print(" ".join(f.job_id for f in futs), flush=True)
        time.sleep(600)
        """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    assert proc.stdout is not None
    job_ids = proc.stdout.readline().split()
    assert len(job_ids) == 3, "the client did not get its three calls running"
    return proc, job_ids


def _existing(cluster: K8sCluster, job_ids: list[str], namespace: str | None = None) -> list[str]:
    names = {j["metadata"]["name"] for j in listed(cluster, "jobs", namespace=namespace)}
    return [j for j in job_ids if j in names]


def test_a_killed_clients_jobs_are_deleted_within_the_bound(
    on_cluster: K8sCluster, tmp_path: Path
) -> None:
    proc, job_ids = _start_client(tmp_path)
    job = on_cluster.get("job", job_ids[0])
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "Lease"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()

    # A living client in the same namespace runs the reaper.
    assert quick().result(timeout=120) == 1
    wait_until(
        lambda: not _existing(on_cluster, job_ids),
        LEASE + REAPER + GC_SLACK,
        "the killed client's Jobs to be deleted",
    )
    took = time.monotonic() - killed

    def pods_left() -> list[str]:
        return [p["metadata"]["name"] for job_id in job_ids for p in pods_of(on_cluster, job_id)]

    wait_until(lambda: not pods_left(), GC_SLACK, "the killed client's pods to be deleted")
    print(f"orphaned Jobs gone {took:.1f} s after SIGKILL (bound {LEASE + REAPER} s + GC)")
    gone = on_cluster.kubectl(
        "get", "lease", owner["name"], "-n", on_cluster.namespace, check=False
    )
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_gc_sessions_deletes_the_expired_lease_of_a_killed_client(
    on_cluster: K8sCluster, tmp_path: Path
) -> None:
    # A namespace where no living client of this test runs a reaper.
    namespace = on_cluster.user_namespace
    proc, job_ids = _start_client(tmp_path, namespace=namespace)
    job = on_cluster.get("job", job_ids[0], namespace)
    lease = job["metadata"]["ownerReferences"][0]["name"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(LEASE + 1)

    dry = ascend_cli("--namespace", namespace, "gc", "--sessions", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    sessions = [r["name"] for r in dry.json if r["kind"] == "session"]
    assert sessions == [lease]
    assert _existing(on_cluster, job_ids, namespace) == job_ids, "a dry run deletes nothing"

    done = ascend_cli("--namespace", namespace, "gc", "--sessions")
    assert done.exit_code == 0, done.stderr
    assert [r["name"] for r in done.json if r["kind"] == "session"] == [lease]
    wait_until(
        lambda: not _existing(on_cluster, job_ids, namespace),
        GC_SLACK,
        "the owned Jobs to be collected",
    )


def test_detached_calls_are_owned_by_no_session_and_survive_their_client(
    on_cluster: K8sCluster, tmp_path: Path
) -> None:
    proc, job_ids = _start_client(tmp_path, detach=True)
    assert "ownerReferences" not in on_cluster.get("job", job_ids[0])["metadata"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert quick().result(timeout=120) == 1  # a living client reaps expired sessions
    time.sleep(LEASE + REAPER + 5)
    assert _existing(on_cluster, job_ids) == job_ids


def test_a_living_client_keeps_its_lease_renewed(on_cluster: K8sCluster) -> None:
    assert quick().result(timeout=120) == 1
    out = on_cluster.kubectl("get", "leases", "-n", on_cluster.namespace, "-o", "json")
    mine = [
        lease
        for lease in json.loads(out.stdout)["items"]
        if lease["spec"].get("holderIdentity", "").endswith(f"/{os.getpid()}")
        and lease["metadata"]["labels"]["ascend.dev/user"] == ascend.configure().user
        and lease["spec"]["leaseDurationSeconds"] == LEASE
    ]
    assert len(mine) == 1
    first = mine[0]["spec"]["renewTime"]
    time.sleep(LEASE * 2)
    again = on_cluster.get("lease", mine[0]["metadata"]["name"])
    assert again["spec"]["renewTime"] > first
    assert again["metadata"]["uid"] == mine[0]["metadata"]["uid"], "never reaped while alive"
