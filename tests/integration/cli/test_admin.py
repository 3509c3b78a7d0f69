"""``ascend admin user add/remove`` and ``ascend doctor`` on the real test cluster, and
two provisioned users who cannot touch each other's jobs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ascend
from tests.cluster.cluster import NAMESPACE, STORAGE_SECRET
from tests.cluster.fixtures_k8s import SUITE_RUNNER_IMAGE, K8sCluster, wait_until
from tests.integration.cli.conftest import ascend_cli

pytestmark = pytest.mark.k8s


@ascend.remote
def add(a: int, b: int) -> int:
    return a + b


@ascend.remote
def sleeper(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "woke"


@pytest.fixture
def shared_storage(k8s_cluster: K8sCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A storage URL every pod can read (the cluster's S3 store: pods see no host folder).
    Its options go into the current settings, which the CLI's flags go over."""
    settings = k8s_cluster.storage_settings(tmp_path_factory)
    # The Secret through which pods reach the store (with real nodes), copied into each
    # provisioned user's namespace by `add`.
    ascend.configure(
        storage_options=settings.get("storage_options"),
        storage_secret=settings.get("storage_secret"),
    )
    return str(settings["storage"])


def _admin(cluster: K8sCluster, *args: str) -> Any:
    return ascend_cli("--backend", "kubernetes", "--kubeconfig", str(cluster.kubeconfig), *args)


@pytest.fixture
def provision(k8s_cluster: K8sCluster, tmp_path: Path) -> Iterator[Any]:
    """``provision(name)`` adds a user with a fresh name; every one is removed after."""
    made: list[str] = []

    def make(prefix: str, *extra: str) -> tuple[str, Path, dict[str, Any]]:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        out = tmp_path / f"{name}.kubeconfig"
        if _store_secret(k8s_cluster) and "--storage-secret" not in extra:
            extra = (*extra, *_store_secret(k8s_cluster))  # the store's way in, for pods
        done = _admin(
            k8s_cluster, "admin", "user", "add", name, "--kubeconfig-out", str(out), *extra
        )
        assert done.exit_code == 0, done.stderr
        made.append(name)
        return name, out, done.json

    yield make
    for name in made:
        _admin(k8s_cluster, "admin", "user", "remove", name, "--keep-data")


def _store_secret(cluster: K8sCluster) -> tuple[str, ...]:
    """``add``'s flags copying the Secret pods reach the store with (real nodes' S3)."""
    if cluster.cluster is None or cluster.cluster.storage is None:
        return ()
    return ("--storage-secret", STORAGE_SECRET, "--from-namespace", NAMESPACE)


def _as_user(name: str, kubeconfig: Path, storage: str) -> None:
    ascend.configure(
        backend="kubernetes",
        kubeconfig=str(kubeconfig),
        namespace=f"ascend-users-{name}",
        user=name,
        storage=storage,  # and storage_secret, if any: set by the shared_storage fixture
        unschedulable_grace=5,
        image=SUITE_RUNNER_IMAGE,
    )


def _user_data(settings: ascend.Settings) -> tuple[Any, str]:
    """The user's folder in the store: (filesystem, path), listings not cached."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(settings.user_prefix, **dict(settings.storage_options))
    fs.invalidate_cache()
    return fs, path


def _versions(cluster: K8sCluster, namespace: str) -> dict[str, str]:
    kinds = "namespace,serviceaccount,role,rolebinding,resourcequota,limitrange,secret"
    out = cluster.kubectl("get", kinds, "-n", namespace, "-o", "json")
    found = {
        f"{i['kind']}/{i['metadata']['name']}": i["metadata"]["resourceVersion"]
        for i in json.loads(out.stdout)["items"]
    }
    ns = cluster.kubectl("get", "namespace", namespace, "-o", "json")
    found["Namespace"] = json.loads(ns.stdout)["metadata"]["resourceVersion"]
    return found


def test_a_provisioned_user_runs_a_call_with_the_kubeconfig_written_for_them(
    k8s_cluster: K8sCluster, provision: Any, shared_storage: str
) -> None:
    store = k8s_cluster.cluster.storage if k8s_cluster.cluster else None
    credentials = [f"--from-literal={k}={v}" for k, v in (store.env if store else {}).items()]
    k8s_cluster.kubectl(
        "create",
        "secret",
        "generic",
        "ascend-storage",
        "-n",
        k8s_cluster.namespace,
        "--from-literal=ASCEND_TEST_MARKER=copied",
        *credentials,  # the pods' way to the store
        check=False,
    )
    name, kubeconfig, out = provision(
        "alice", "--storage-secret", "ascend-storage", "--from-namespace", k8s_cluster.namespace
    )
    namespace = out["namespace"]
    assert namespace == f"ascend-users-{name}"
    assert out["service_account"] == f"ascend-user-{name}"
    labels = k8s_cluster.get("namespace", namespace, namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    copied = k8s_cluster.get("secret", "ascend-storage", namespace)
    assert copied["data"] == k8s_cluster.get("secret", "ascend-storage")["data"]

    _as_user(name, kubeconfig, shared_storage)
    ascend.configure(storage_secret="ascend-storage")
    assert add(2, 3).result(timeout=120) == 5


def test_adding_a_user_twice_changes_nothing(k8s_cluster: K8sCluster, provision: Any) -> None:
    name, kubeconfig, out = provision("bob")
    before = _versions(k8s_cluster, out["namespace"])
    text = kubeconfig.read_text()
    again = _admin(
        k8s_cluster,
        "admin",
        "user",
        "add",
        name,
        "--kubeconfig-out",
        str(kubeconfig),
        *_store_secret(k8s_cluster),  # as the first time
    )
    assert again.exit_code == 0, again.stderr
    assert {o["action"] for o in again.json["objects"]} == {"unchanged"}
    assert _versions(k8s_cluster, out["namespace"]) == before
    assert kubeconfig.read_text() == text
    assert kubeconfig.stat().st_mode & 0o777 == 0o600, "it holds a token"


def test_doctor_passes_for_a_provisioned_user(provision: Any, shared_storage: str) -> None:
    name, kubeconfig, _ = provision("carol")
    _as_user(name, kubeconfig, shared_storage)
    done = ascend_cli("doctor")
    assert done.exit_code == 0, done.stdout + done.stderr
    checks = {c["name"]: c for c in done.json}
    expected = {"settings", "cluster reachable", "permissions", "signing key", "storage"}
    if ascend.configure().storage_secret:  # pods reach the store with it
        expected.add("storage secret")
    assert set(checks) == {*expected, "runner job"}
    assert all(c["ok"] for c in checks.values())


@pytest.mark.parametrize(
    ("rule", "verb", "named"),
    [
        ("jobs", "delete", "delete jobs.batch"),
        ("pods/log", "get", "get pods/log"),
        ("leases", "patch", "patch leases.coordination.k8s.io"),
    ],
)
def test_doctor_names_the_permission_removed_from_the_role(
    k8s_cluster: K8sCluster,
    provision: Any,
    shared_storage: str,
    rule: str,
    verb: str,
    named: str,
) -> None:
    name, kubeconfig, out = provision("dave")
    role = k8s_cluster.get("role", "ascend-user", out["namespace"])
    for entry in role["rules"]:
        if rule in entry["resources"]:
            entry["resources"].remove(rule)
            role["rules"].append(
                {**entry, "resources": [rule], "verbs": [v for v in entry["verbs"] if v != verb]}
            )
            break
    role["rules"] = [r for r in role["rules"] if r["resources"]]
    k8s_cluster.kubectl("apply", "-f", "-", input=json.dumps(role))
    _as_user(name, kubeconfig, shared_storage)
    done = ascend_cli("doctor", "--no-job")
    assert done.exit_code == 1
    permissions = next(c for c in done.json if c["name"] == "permissions")
    assert permissions["ok"] is False
    assert permissions["detail"].endswith(f": {named}"), permissions["detail"]

    # add again repairs the Role
    fixed = _admin(k8s_cluster, "admin", "user", "add", name)
    assert {"kind": "Role", "name": "ascend-user", "action": "updated"} in fixed.json["objects"]


def test_one_user_cannot_see_or_cancel_anothers_jobs(
    k8s_cluster: K8sCluster, provision: Any, shared_storage: str
) -> None:
    alice, alice_config, alice_out = provision("alice")
    bob, bob_config, _ = provision("bob")
    _as_user(alice, alice_config, shared_storage)
    fut = sleeper(120)
    wait_until(lambda: fut.running(), 60, "alice's call to run")

    mine = ascend_cli("jobs", "list")
    assert [r["job_id"] for r in mine.json if r["state"] == "running"] == [fut.job_id]

    as_bob = ("--kubeconfig", str(bob_config), "--user", bob)
    theirs = ascend_cli(*as_bob, "--namespace", alice_out["namespace"], "jobs", "list")
    assert theirs.exit_code == 1
    assert "refused GET" in theirs.stderr
    cancel = ascend_cli(
        *as_bob, "--namespace", alice_out["namespace"], "jobs", "cancel", fut.job_id
    )
    assert cancel.exit_code == 1
    everyone = ascend_cli(*as_bob, "jobs", "list", "--all-users")
    assert everyone.exit_code == 1
    assert "--all-users" in everyone.stderr and "cluster-wide" in everyone.stderr
    time.sleep(1)
    assert fut.running()

    admin = ascend_cli("--kubeconfig", str(k8s_cluster.kubeconfig), "jobs", "list", "--all-users")
    assert admin.exit_code == 0, admin.stderr
    assert any(
        r["job_id"] == fut.job_id
        and r["user"] == alice
        and r["namespace"] == alice_out["namespace"]
        for r in admin.json
    )
    fut.cancel()


def test_remove_deletes_the_users_namespace_and_their_data(
    k8s_cluster: K8sCluster, provision: Any, shared_storage: str
) -> None:
    name, kubeconfig, out = provision("erin")
    _as_user(name, kubeconfig, shared_storage)
    assert add(1, 1).result(timeout=120) == 2
    settings = ascend.configure()
    fs, folder = _user_data(settings)
    assert fs.exists(folder)
    done = ascend_cli(
        "--kubeconfig",
        str(k8s_cluster.kubeconfig),
        "--storage",
        shared_storage,
        "admin",
        "user",
        "remove",
        name,
    )
    assert done.exit_code == 0, done.stderr
    assert done.json["deleted"] is True
    fs, folder = _user_data(settings)
    assert not fs.exists(folder)
    wait_until(
        lambda: (
            k8s_cluster.kubectl("get", "namespace", out["namespace"], check=False).returncode != 0
            or "Terminating" in k8s_cluster.kubectl("get", "namespace", out["namespace"]).stdout
        ),
        30,
        "the namespace to go",
    )


def test_the_reaper_manifest_is_accepted_by_the_api_server(k8s_cluster: K8sCluster) -> None:
    done = ascend_cli(
        "--backend",
        "kubernetes",
        "--kubeconfig",
        str(k8s_cluster.kubeconfig),
        "--namespace",
        k8s_cluster.user_namespace,
        "admin",
        "reaper",
        "--manifest",
        output_json=False,
    )
    assert done.exit_code == 0, done.stderr
    kinds = [i["kind"] for i in json.loads(done.stdout)["items"]]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "CronJob"]
    applied = k8s_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=done.stdout)
    assert "cronjob.batch/ascend-reaper created (server dry run)" in applied.stdout


def test_a_role_without_leases_still_runs_calls_unowned(
    k8s_cluster: K8sCluster, provision: Any, shared_storage: str
) -> None:
    name, kubeconfig, out = provision("fay")
    role = k8s_cluster.get("role", "ascend-user", out["namespace"])
    role["rules"] = [r for r in role["rules"] if "leases" not in r["resources"]]
    k8s_cluster.kubectl("apply", "-f", "-", input=json.dumps(role))
    _as_user(name, kubeconfig, shared_storage)
    fut = add(4, 4)
    assert fut.result(timeout=120) == 8
    job = k8s_cluster.get("job", fut.job_id, out["namespace"])
    assert "ownerReferences" not in job["metadata"]
    doctor = ascend_cli("doctor", "--no-job")
    assert doctor.exit_code == 1
    permissions = next(c for c in doctor.json if c["name"] == "permissions")
    assert "create leases.coordination.k8s.io" in permissions["detail"]


def test_doctor_names_an_unreachable_cluster(tmp_path: Path, shared_storage: str) -> None:
    missing = tmp_path / "no.kubeconfig"
    done = ascend_cli(
        "--backend",
        "kubernetes",
        "--kubeconfig",
        str(missing),
        "--storage",
        shared_storage,
        "doctor",
        "--no-job",
    )
    assert done.exit_code == 1
    first = next(c for c in done.json if c["ok"] is False)
    assert first["name"] == "kubeconfig" and str(missing) in first["detail"]


@pytest.mark.parametrize(
    ("flags", "fits"),
    [
        (("--gpu", "2"), True),
        (("--gpu", "3"), False),
        (("--node-type", "gpu-standard", "--gpu", "1"), True),
        (("--node-type", "tpu-giant"), False),
    ],
)
def test_doctor_says_whether_any_node_could_fit(
    k8s_cluster: K8sCluster, shared_storage: str, flags: tuple[str, ...], fits: bool
) -> None:
    if not k8s_cluster.nodes:
        pytest.skip("needs the test cluster's own nodes (gpu-1 has 2 GPUs)")
    done = ascend_cli(
        "--backend",
        "kubernetes",
        "--kubeconfig",
        str(k8s_cluster.kubeconfig),
        "--namespace",
        k8s_cluster.namespace,
        "--storage",
        shared_storage,
        "doctor",
        "--no-job",
        *flags,
    )
    nodes = next(c for c in done.json if c["name"] == "nodes")
    assert nodes["ok"] is fits, nodes
    assert done.exit_code == (0 if fits else 1)


def test_doctor_skips_the_node_check_for_a_user_who_cannot_list_nodes(
    provision: Any, shared_storage: str
) -> None:
    name, kubeconfig, _ = provision("gus")
    _as_user(name, kubeconfig, shared_storage)
    done = ascend_cli("doctor", "--no-job", "--gpu", "1")
    assert done.exit_code == 0, done.stdout
    nodes = next(c for c in done.json if c["name"] == "nodes")
    assert nodes["ok"] is None and "cannot list nodes" in nodes["detail"]
