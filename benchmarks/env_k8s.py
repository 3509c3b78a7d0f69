"""Environments on the test cluster: an in-cluster build, and the time from a call to
its function's first line with a warm environment (the pod starts from the stock base
image and bootstraps) against a call without requirements on the runner image, sampled
interleaved in the same run."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import ascend
from ascend.backends._kubernetes._spec import default_image
from benchmarks._report import write
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

        start = time.perf_counter()
        with_env().result(timeout=600)
        cold_build_call = time.perf_counter() - start

        env_samples, plain_samples = [], []
        for _ in range(REPEAT):
            for fn, samples in ((with_env, env_samples), (plain, plain_samples)):
                submitted = time.time()
                first_line = fn().result(timeout=300)
                samples.append(first_line - submitted)

    env_s, plain_s = statistics.median(env_samples), statistics.median(plain_samples)
    figures = {
        "cold_in_cluster_build_call_s": cold_build_call,
        "call_to_first_line_warm_env_s": env_s,
        "call_to_first_line_plain_s": plain_s,
        "warm_env_over_plain": env_s / plain_s,
    }
    table = [
        ("first call: in-cluster build Job + the call", f"{cold_build_call:.1f} s", "-"),
        (
            "call to the function's first line: warm environment (bootstrap) vs runner image",
            f"{env_s * 1e3:.0f} ms vs {plain_s * 1e3:.0f} ms ({env_s / plain_s:.2f}x)",
            "close to 1x",
        ),
    ]
    write("envs-k8s", figures, table)


if __name__ == "__main__":
    main()
