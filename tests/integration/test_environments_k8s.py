"""Environments on Kubernetes: the build Job and pods started through the bootstrap.

Written against the real-node test cluster (kubelets and containerd running stock
``python:X.Y-slim`` images through the suite's registry mirror; pods reach the suite's
own address, not loopback). The suite serves its wheel index over HTTP on that address
(the cluster's ``suite_address``, or ``ASCEND_TEST_SUITE_ADDRESS``) and builds use it by
default, so no pod ever reaches PyPI.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ascend
from ascend import _config, _environments
from ascend_runner import protocol
from tests.cluster.cluster import STORAGE_SECRET
from tests.cluster.fixtures_k8s import K8sCluster
from tests.cluster.stores import Store
from tests.envindex import (
    TEST_MODULE,
    TEST_PACKAGE,
    TEST_VALUE,
    StallingProxy,
    repack_with_dependencies,
    serve,
    suite_address,
    wheel_index,
)
from tests.jobs import a_job

pytestmark = pytest.mark.k8s


def test_a_pod_with_an_environment_starts_the_bootstrap_on_the_base_image() -> None:
    from ascend.backends._kubernetes._spec import job_manifest

    settings = _config.resolve({})
    spec = _environments.spec_for(settings, ["tqdm"])
    env = _environments.Environment(spec, "s3://b/envs/x.tar.gz", "c" * 64, 10)
    job = a_job(
        settings,
        resources=ascend.Resources.build(requirements=["tqdm"]),
        environment_spec=spec,
        environment=env,
        environment_url="https://signed/x",
    )
    [container] = job_manifest(job, session="s")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == spec.base_image
    assert container["command"][:3] == ["python", "-u", "-c"]
    assert "def main() -> None" in container["command"][3]
    values = {e["name"]: e.get("value") for e in container["env"]}
    assert values[protocol.ENV_ENV_URL] == "https://signed/x"
    assert values[protocol.ENV_ENV_SHA256] == "c" * 64


def test_a_pod_with_a_registry_environment_runs_its_image_by_digest() -> None:
    from ascend.backends._kubernetes._spec import job_manifest

    settings = _config.resolve({})
    spec = _environments.spec_for(settings, ["tqdm"])
    ref = "registry.example/envs@sha256:" + "d" * 64
    env = _environments.Environment(spec, "", "", 0, image=ref)
    job = a_job(
        settings,
        resources=ascend.Resources.build(requirements=["tqdm"]),
        environment_spec=spec,
        environment=env,
    )
    [container] = job_manifest(job, session="s")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == ref
    assert container["command"] == ["python", "-u", "-m", "ascend_runner"]
    assert protocol.ENV_ENV_URL not in {e["name"] for e in container["env"]}


@pytest.fixture(scope="session")
def index_url(k8s_cluster: K8sCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The suite's wheel index (the test package, the runner's dependencies, uv) served
    over HTTP where pods can reach it."""
    folder = wheel_index(tmp_path_factory.mktemp("cluster-wheels"), with_build_tools=True)
    repack_with_dependencies(["s3fs"], folder)  # the runner's S3 extra
    with serve(folder, suite_address(k8s_cluster)) as url:
        yield url


@pytest.fixture
def on_cluster(
    k8s_cluster: K8sCluster,
    clean_jobs: None,
    index_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> K8sCluster:
    ascend.configure(
        backend="kubernetes",
        kubeconfig=str(k8s_cluster.kubeconfig),
        namespace=k8s_cluster.namespace,
        **k8s_cluster.storage_settings(tmp_path_factory),  # where pods can read
        unschedulable_grace=2,
        index_url="none",
        find_links=index_url,
    )
    return k8s_cluster


def uses_test_package() -> str:
    import ascend_envtest_pkg  # type: ignore[import-not-found]

    return str(ascend_envtest_pkg.VALUE)


def _build_jobs(cluster: K8sCluster, namespace: str | None = None) -> list[dict]:
    out = cluster.kubectl(
        "get", "jobs", "-n", namespace or cluster.namespace,
        "-l", f"{_environments.LABEL_COMPONENT}=env-build", "-o", "json",
    )  # fmt: skip
    return json.loads(out.stdout)["items"]


def test_a_call_imports_a_requirement_built_in_the_cluster(on_cluster: K8sCluster) -> None:
    assert TEST_MODULE not in os.environ.get("PYTHONPATH", "")
    fut = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)()
    assert fut.result(timeout=600) == TEST_VALUE
    assert len(_build_jobs(on_cluster)) == 1
    assert any("[env]" in line for line in fut.logs())


def _plain() -> str:
    import sys

    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def test_a_call_without_requirements_or_image_runs_on_the_stock_base_image(
    on_cluster: K8sCluster,
) -> None:
    """Nothing of ascend's published: the runner arrives through the bootstrap, built
    once, and a second call builds nothing."""
    from ascend.backends._kubernetes._spec import LABEL_FUNCTION, label_value

    assert ascend.configure().image is None
    fn = ascend.remote(_plain)
    expected = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert fn().result(timeout=600) == expected
    selector = f"{LABEL_FUNCTION}={label_value(_plain.__name__)}"
    out = on_cluster.kubectl(
        "get", "pods", "-n", on_cluster.namespace, "-l", selector, "-o", "json"
    )
    [pod] = json.loads(out.stdout)["items"]
    [container] = pod["spec"]["containers"]
    assert container["image"] == f"python:{expected}-slim"
    assert container["command"][:3] == ["python", "-u", "-c"]
    assert fn().result(timeout=600) == expected
    assert len(_build_jobs(on_cluster)) == 1


def test_builds_use_the_clusters_index_when_the_user_names_none(
    on_cluster: K8sCluster, index_url: str
) -> None:
    """The ascend-defaults ConfigMap is to builds what a registry mirror is to images: a
    script written for another cluster runs here with no extra setting."""
    ascend.configure(index_url=None, find_links=None)
    assert ascend.configure().find_links is None
    on_cluster.kubectl(
        "create", "configmap", "ascend-defaults", "-n", on_cluster.namespace,
        "--from-literal=index_url=none", f"--from-literal=find_links={index_url}",
    )  # fmt: skip
    try:
        # Built ahead (`ascend env build`): the same environment the call then uses.
        ahead = asyncio.run(_environments.build_environment(ascend.configure(), [TEST_PACKAGE]))
        [build] = _build_jobs(on_cluster)
        fut = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)()
        assert fut.result(timeout=600) == TEST_VALUE
        [still] = _build_jobs(on_cluster)
        assert still["metadata"]["uid"] == build["metadata"]["uid"]
        assert build["metadata"]["labels"][_environments.LABEL_ENV_KEY] == ahead.key[:63]
    finally:
        on_cluster.kubectl(
            "delete", "configmap", "ascend-defaults", "-n", on_cluster.namespace, check=False
        )


def test_a_call_with_a_locally_built_environment_runs_through_the_bootstrap(
    on_cluster: K8sCluster,
) -> None:
    ascend.configure(build="local")
    fut = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)()
    assert fut.result(timeout=600) == TEST_VALUE
    assert _build_jobs(on_cluster) == []


def test_a_second_call_with_the_same_environment_builds_nothing(on_cluster: K8sCluster) -> None:
    fn = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)
    fn().result(timeout=600)
    [first] = _build_jobs(on_cluster)
    again = fn()
    assert again.result(timeout=600) == TEST_VALUE
    [still] = _build_jobs(on_cluster)
    assert still["metadata"]["uid"] == first["metadata"]["uid"]
    assert not any("building environment" in line for line in again.logs())


def test_ten_concurrent_identical_calls_cause_one_build_job(on_cluster: K8sCluster) -> None:
    fn = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)
    futures = [fn() for _ in range(10)]
    assert [f.result(timeout=600) for f in futures] == [TEST_VALUE] * 10
    assert len(_build_jobs(on_cluster)) == 1


def test_a_failing_requirement_fails_the_call_with_its_build_log(on_cluster: K8sCluster) -> None:
    fn = ascend.remote(requirements=["ascend-envtest-missing"])(uses_test_package)
    with pytest.raises(ascend.ImageBuildError) as caught:
        fn().result(timeout=600)
    assert caught.value.requirement == "ascend-envtest-missing"
    assert "ascend-envtest-missing" in caught.value.log


def test_an_unreachable_index_fails_the_in_cluster_build_naming_the_index(
    on_cluster: K8sCluster,
) -> None:
    import socket

    address = suite_address(on_cluster)
    with socket.socket() as closed:  # bound, then closed: nothing listens there
        closed.bind((address, 0))
        port = closed.getsockname()[1]
    index = f"http://{address}:{port}/simple/"
    ascend.configure(index_url=index, find_links=None)
    fn = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)
    with pytest.raises(ascend.ImageBuildError) as caught:
        fn().result(timeout=600)
    assert caught.value.requirement is None
    assert f"the package index {index} is unreachable from the cluster's build pod" in str(
        caught.value
    )
    assert "index_url=... (ASCEND_INDEX_URL)" in str(caught.value)


def test_the_build_job_is_admitted_where_the_restricted_profile_is_enforced(
    on_cluster: K8sCluster, tmp_path: Path
) -> None:
    namespace = "ascend-env-restricted"
    on_cluster.kubectl("create", "namespace", namespace, check=False)
    on_cluster.kubectl(
        "label", "--overwrite", "namespace", namespace,
        "pod-security.kubernetes.io/enforce=restricted",
    )  # fmt: skip
    try:
        store = on_cluster.cluster.storage if on_cluster.cluster else None
        if store is not None:  # the pods' way to the store, as in every test namespace
            on_cluster.kubectl(
                "create", "secret", "generic", STORAGE_SECRET, "-n", namespace,
                *(f"--from-literal={k}={v}" for k, v in store.env.items()), check=False,
            )  # fmt: skip
        ascend.configure(namespace=namespace)
        fut = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)()
        assert fut.result(timeout=600) == TEST_VALUE
        [build] = _build_jobs(on_cluster, namespace)
        assert build["status"].get("succeeded") == 1
    finally:
        on_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.mark.stores
def test_an_in_cluster_build_publishes_to_s3_through_presigned_urls(
    on_cluster: K8sCluster, s3_store: Store
) -> None:
    """The path a real cluster takes: the build pod writes the archive with presigned
    PUTs, the call's pod downloads it with a presigned GET (no SDK in the image)."""
    s3_store.activate()
    secret = "store-s3-envs"
    args = [f"--from-literal={k}={v}" for k, v in s3_store.env.items()]
    on_cluster.kubectl(
        "create", "secret", "generic", secret, "-n", on_cluster.namespace, *args, check=False
    )
    ascend.configure(
        storage=f"{s3_store.url}/envs-{os.getpid()}",
        storage_options=s3_store.storage_options,
        storage_secret=secret,
    )
    fut = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)()
    assert fut.result(timeout=600) == TEST_VALUE
    assert len(_build_jobs(on_cluster)) == 1
    fs = s3_store.filesystem()
    assert fs.glob(f"{s3_store.url}/envs-{os.getpid()}/envs/sha256/*.tar.gz")


@pytest.mark.stores
def test_a_call_runs_on_its_environment_image_in_registry_mode(
    on_cluster: K8sCluster, oci_registry: object
) -> None:
    """Needs nodes whose container runtime pulls from the suite's registry (where the
    docker.io mirror keeps library/python:X.Y-slim): the real-node cluster."""
    if getattr(on_cluster.cluster, "suite_address", None) is None:
        pytest.skip(
            "registry mode needs the suite's own test cluster: its nodes' containerd pulls "
            "from the suite's registry (on kind, images come from kind's own loading)"
        )
    # The cluster's own registry: it holds library/python:X.Y-slim (the docker.io mirror)
    # and every node's containerd pulls from it over plain HTTP.
    registry = on_cluster.cluster.registry if on_cluster.cluster else None
    url = registry.url if registry is not None else oci_registry.url  # type: ignore[attr-defined]
    ascend.configure(registry=f"http://{url}/ascend-envs", build="local")
    fut = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)()
    assert fut.result(timeout=600) == TEST_VALUE
    pods = json.loads(
        on_cluster.kubectl(
            "get", "pods", "-n", on_cluster.namespace,
            "-l", f"ascend.dev/job-id={fut.job_id}", "-o", "json",
        ).stdout
    )["items"]  # fmt: skip
    image = pods[0]["spec"]["containers"][0]["image"]
    assert "/ascend-envs@sha256:" in image


@pytest.fixture
def private_registry_on_cluster(
    on_cluster: K8sCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Any]]:
    """The cluster's private registry (Basic auth; the same images as the mirror): this
    client logged in through ``DOCKER_CONFIG``, and a ``kubernetes.io/dockerconfigjson``
    Secret ``registry-push`` with the same credentials in the namespace. Yields the
    ``registry`` setting and the registry."""
    from tests.cluster.stores import docker_config_json

    if on_cluster.cluster is None or on_cluster.cluster.private_registry is None:
        pytest.skip("the private registry is the suite's own test cluster's (not kind's)")
    private = on_cluster.cluster.private_registry
    config = private.docker_config(tmp_path / "docker")
    monkeypatch.setenv("DOCKER_CONFIG", str(config.parent))
    _secret(on_cluster, "registry-push", docker_config_json(private.url, *private.credentials))
    try:
        # A repository of its own: each test builds (or finds) its images afresh.
        yield f"http://{private.url}/ascend-envs-{uuid.uuid4().hex[:8]}", private
    finally:
        on_cluster.kubectl(
            "delete", "secret", "registry-push", "registry-wrong", "-n", on_cluster.namespace,
            "--ignore-not-found", check=False,
        )  # fmt: skip


def _secret(cluster: K8sCluster, name: str, config: dict[str, Any]) -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": cluster.namespace},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": json.dumps(config)},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def _image_build_jobs(cluster: K8sCluster) -> list[dict[str, Any]]:
    return [j for j in _build_jobs(cluster) if j["metadata"]["name"].startswith("ascend-img-")]


@pytest.mark.slow
def test_a_call_runs_on_an_image_built_and_pushed_in_the_cluster_to_a_private_registry(
    private_registry_on_cluster: tuple[str, Any], on_cluster: K8sCluster
) -> None:
    """Registry mode, built in the cluster (the default): a build Job pushes the image
    with the registry_secret's credentials; the pod pulls it with them (imagePullSecrets,
    since the registry refuses anonymous pulls); three concurrent calls cause one build;
    a later call builds nothing."""
    registry, private = private_registry_on_cluster
    ascend.configure(registry=registry, registry_secret="registry-push")
    fn = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)
    futs = [fn() for _ in range(3)]
    assert [f.result(timeout=600) for f in futs] == [TEST_VALUE] * 3
    [build] = _image_build_jobs(on_cluster)
    pod = build["spec"]["template"]["spec"]
    assert pod["volumes"][0]["secret"]["secretName"] == "registry-push"
    assert pod["securityContext"]["runAsNonRoot"] is True
    fut = futs[0]
    assert any("pushing layer" in line for f in futs for line in f.logs())  # build output
    [runner_pod] = json.loads(
        on_cluster.kubectl(
            "get", "pods", "-n", on_cluster.namespace,
            "-l", f"ascend.dev/job-id={fut.job_id}", "-o", "json",
        ).stdout
    )["items"]  # fmt: skip
    image = runner_pod["spec"]["containers"][0]["image"]
    assert image.startswith(f"{private.url}/ascend-envs-") and "@sha256:" in image
    assert runner_pod["spec"]["imagePullSecrets"] == [{"name": "registry-push"}]
    # Cached: the tag exists, so the second call creates no build Job.
    uid = build["metadata"]["uid"]
    assert fn().result(timeout=600) == TEST_VALUE
    assert [j["metadata"]["uid"] for j in _image_build_jobs(on_cluster)] == [uid]
    # The image exists, but the pull Secret named does not: refused before any pod.
    ascend.configure(registry_secret="no-such-secret")
    with pytest.raises(ascend.ConfigError, match="no-such-secret"):
        fn().result(timeout=120)


@pytest.mark.slow
def test_an_image_build_whose_push_is_refused_fails_the_call_naming_the_registry(
    private_registry_on_cluster: tuple[str, Any], on_cluster: K8sCluster
) -> None:
    from tests.cluster.stores import docker_config_json

    registry, private = private_registry_on_cluster
    _secret(on_cluster, "registry-wrong", docker_config_json(private.url, "ascend-pusher", "no"))
    # A repository no other test pushed to: the image does not exist, so it is built.
    ascend.configure(registry=f"{registry}-refused", registry_secret="registry-wrong")
    fut = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)()
    with pytest.raises(ascend.ImageBuildError) as caught:
        fut.result(timeout=600)
    message = str(caught.value)
    assert "pushing the image failed" in message
    assert f"registry {private.url}" in message and "refused" in message
    assert "registry_secret" in message  # the way out
    assert caught.value.requirement is None  # the requirements are not at fault


def test_a_registry_secret_that_does_not_exist_fails_before_any_build(
    private_registry_on_cluster: tuple[str, Any], on_cluster: K8sCluster
) -> None:
    registry, _ = private_registry_on_cluster
    ascend.configure(registry=registry, registry_secret="no-such-secret")
    fut = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)()
    with pytest.raises(ascend.ConfigError, match="no-such-secret.*kubectl create secret"):
        fut.result(timeout=120)
    assert _image_build_jobs(on_cluster) == []


def test_a_kubelets_startup_probe_holds_startup_timeout_until_the_runner_starts(
    on_cluster: K8sCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """On a kubelet a bootstrap pod's container is ``started`` only once the bootstrap
    has unpacked the environment (its startup probe): a download that stalls is the
    client's StartupTimeout, counted from the pod's creation."""
    storage = on_cluster.storage_settings(tmp_path_factory)  # S3 on the suite's address
    ascend.configure(build="local", **storage)
    fn = ascend.remote(requirements=[TEST_PACKAGE])(uses_test_package)
    assert fn().result(timeout=600) == TEST_VALUE  # the probe passes: the runner ran
    from urllib.parse import urlsplit

    endpoint = storage["storage_options"]["endpoint_url"]
    # Beside the store, on the address pods already reach it on.
    proxy = StallingProxy(endpoint, host=urlsplit(endpoint).hostname or "127.0.0.1")
    try:
        ascend.configure(
            storage_options={**storage["storage_options"], "endpoint_url": proxy.url},
            startup_timeout=15,  # the pod starts in seconds; the fetch never ends
        )
        with pytest.raises(ascend.StartupTimeout) as caught:
            fn().result(timeout=300)
        assert proxy.stalled, "the bootstrap's download never reached the store"
        assert "the bootstrap is still fetching and unpacking" in str(caught.value)
    finally:
        proxy.close()


def test_doctor_checks_the_registry_and_its_secret(
    private_registry_on_cluster: tuple[str, Any],
    on_cluster: K8sCluster,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from tests.integration.cli.conftest import ascend_cli

    registry, private = private_registry_on_cluster
    ascend.configure(registry=registry, registry_secret="registry-push")
    done = ascend_cli("doctor", "--no-job")
    checks = {c["name"]: c for c in done.json}
    assert checks["registry"]["ok"] is True, checks["registry"]
    assert checks["registry secret"]["ok"] is True, checks["registry secret"]

    ascend.configure(registry_secret="no-such-secret")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nobody"))  # not logged in
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))
    done = ascend_cli("doctor", "--no-job")
    assert done.exit_code == 1
    checks = {c["name"]: c for c in done.json}
    assert checks["registry secret"]["ok"] is False
    assert "docker-registry no-such-secret" in checks["registry secret"]["fix"]
    assert checks["registry"]["ok"] is False
    assert f"registry {private.url}" in checks["registry"]["detail"]
    assert "holds none" in checks["registry"]["detail"]
    assert "docker login" in checks["registry"]["fix"]
