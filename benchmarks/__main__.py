"""Run benchmarks: ``python -m benchmarks [local ...]`` (all suites by default)."""

from __future__ import annotations

import argparse
import subprocess
import sys

from benchmarks import (
    cluster_nodes,
    env_build,
    env_k8s,
    k8s_latency,
    k8s_map,
    local_overhead,
    output_throughput,
    serialization,
)

SUITES = {
    "local": local_overhead.main,
    "output": output_throughput.main,
    "serialization": serialization.main,
    "kubernetes": k8s_latency.main,
    "map": k8s_map.main,
    "envs": env_build.main,
    "envs-k8s": env_k8s.main,
}
# Run only when named: starts real kubelets, which change the host (and are restored).
ON_REQUEST = {"nodes": cluster_nodes.main}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "suites", nargs="*", choices=[*SUITES, *ON_REQUEST, []], help="suites to run"
    )
    args = parser.parse_args()
    names = args.suites or list(SUITES)
    if len(names) == 1:
        {**SUITES, **ON_REQUEST}[names[0]]()
        return
    # One process per suite: a suite's clients (and their retries against a cluster that
    # has stopped) must not show in the next suite's counts.
    for name in names:
        subprocess.run([sys.executable, "-m", "benchmarks", name], check=True)


if __name__ == "__main__":
    main()
