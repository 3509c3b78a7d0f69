"""Environments on the test cluster: an in-cluster build, and the time from a call to
its function's first line with a warm environment against a call without requirements
on the runner image, sampled interleaved in the same run — in bucket mode (the pod
starts from the stock base image and bootstraps) and in registry mode (the build Job
pushes an image to the cluster's private registry; the pod pulls it with
``registry_secret``)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ascend
from ascend.backends._kubernetes._spec import default_image
from benchmarks._report import write
from tests.cluster.stores import docker_config_json
from tests.envindex import TEST_PACKAGE, repack_with_dependencies, serve, wheel_index

REPEAT = 10


def first_line_with_env() -> float:
    started = time.time()
    import ascend_envtest_pkg  # type: ignore[import-not-found]  # noqa: F401

    return started


def first_line_plain() -> float:
    return time.time()


def main() -> None:
    from tests.cluster.cluster import Cluster

    with (
        tempfile.TemporaryDirectory() as tmp,
        Cluster() as cluster,
        serve(
            wheel_index(Path(tmp) / "wheels", with_build_tools=True), cluster.suite_address
        ) as wheels,
    ):
        os.environ["XDG_CONFIG_HOME"] = os.path.join(tmp, "config")
        repack_with_dependencies(["s3fs"], Path(tmp) / "wheels")  # the runner's S3 extra
        ascend.configure(
            backend="kubernetes",
            kubeconfig=str(cluster.kubeconfig),
            namespace=cluster.namespace,
            stream_logs=False,
            index_url="none",
            find_links=wheels,
            **cluster.storage_settings(),  # S3 that pods reach
        )
        with_env = ascend.remote(requirements=[TEST_PACKAGE])(first_line_with_env)
        plain = ascend.remote(image=default_image())(first_line_plain)
        plain().result(timeout=120)  # connect, open the watches, create the signing Secret

        cold_build_call, env_samples, plain_samples = _sample(with_env, plain)

        # Registry mode: the same function, its environment an image built in the cluster.
        private = cluster.private_registry
        assert private is not None
        docker = Path(tmp) / "docker"
        os.environ["DOCKER_CONFIG"] = str(private.docker_config(docker).parent)
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "registry-push", "namespace": cluster.namespace},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {
                ".dockerconfigjson": json.dumps(
                    docker_config_json(private.url, *private.credentials or ("", ""))
                )
            },
        }
        subprocess.run(
            [*cluster_kubectl(cluster), "apply", "-f", "-"],
            input=json.dumps(secret), text=True, check=True, capture_output=True,
        )  # fmt: skip
        ascend.configure(
            registry=f"http://{private.url}/bench-envs-{uuid.uuid4().hex[:8]}",
            registry_secret="registry-push",
        )
        image_cold, image_samples, image_plain = _sample(with_env, plain)

    env_s, plain_s = statistics.median(env_samples), statistics.median(plain_samples)
    image_s, image_plain_s = statistics.median(image_samples), statistics.median(image_plain)
    figures = {
        "cold_in_cluster_build_call_s": cold_build_call,
        "call_to_first_line_warm_env_s": env_s,
        "call_to_first_line_plain_s": plain_s,
        "warm_env_over_plain": env_s / plain_s,
        "registry_cold_in_cluster_build_push_call_s": image_cold,
        "registry_call_to_first_line_warm_image_s": image_s,
        "registry_call_to_first_line_plain_s": image_plain_s,
        "registry_warm_image_over_plain": image_s / image_plain_s,
    }
    table = [
        (
            "bucket mode, first call: in-cluster build Job + the call",
            f"{cold_build_call:.1f} s",
            "-",
        ),
        (
            "bucket mode, call to the function's first line: warm environment (bootstrap) "
            "vs runner image",
            f"{env_s * 1e3:.0f} ms vs {plain_s * 1e3:.0f} ms ({env_s / plain_s:.2f}x)",
            "close to 1x",
        ),
        (
            "registry mode, first call: in-cluster build Job + push + pull + the call",
            f"{image_cold:.1f} s",
            "-",
        ),
        (
            "registry mode, call to the function's first line: warm image (pulled) vs runner image",
            f"{image_s * 1e3:.0f} ms vs {image_plain_s * 1e3:.0f} ms "
            f"({image_s / image_plain_s:.2f}x)",
            "close to 1x",
        ),
    ]
    write("envs-k8s", figures, table)


def _sample(with_env: Any, plain: Any) -> tuple[float, list[float], list[float]]:
    """The first call (it builds), then ``REPEAT`` interleaved pairs of calls: seconds
    from submission to each function's first line."""
    start = time.perf_counter()
    with_env().result(timeout=600)
    cold = time.perf_counter() - start
    env_samples: list[float] = []
    plain_samples: list[float] = []
    for _ in range(REPEAT):
        for fn, samples in ((with_env, env_samples), (plain, plain_samples)):
            submitted = time.time()
            first_line = fn().result(timeout=300)
            samples.append(first_line - submitted)
    return cold, env_samples, plain_samples


def cluster_kubectl(cluster: Any) -> list[str]:
    from tests.cluster import build

    return [str(build.binary_path()), "kubectl", f"--kubeconfig={cluster.kubeconfig}"]


if __name__ == "__main__":
    main()
