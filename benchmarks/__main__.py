"""Run benchmarks: ``python -m benchmarks [local ...]`` (all suites by default)."""

from __future__ import annotations

import argparse

from benchmarks import k8s_latency, k8s_map, local_overhead

SUITES = {
    "local": local_overhead.main,
    "kubernetes": k8s_latency.main,
    "map": k8s_map.main,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suites", nargs="*", choices=[*SUITES, []], help="suites to run")
    args = parser.parse_args()
    for name in args.suites or list(SUITES):
        SUITES[name]()


if __name__ == "__main__":
    main()
