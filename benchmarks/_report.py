"""Writing benchmark results: a JSON file for machines, a Markdown table for the README."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time of ``repeat`` runs of ``fn``."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def write(name: str, figures: dict[str, Any], table: list[tuple[str, str, str]]) -> None:
    """Save ``figures`` as JSON and ``table`` (measure, value, goal) as Markdown."""
    RESULTS.mkdir(exist_ok=True)
    machine = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"machine": machine, "figures": figures}, indent=2) + "\n"
    )
    lines = [
        f"<!-- written by `python -m benchmarks {name}` on {machine['date']}, "
        f"{machine['cpus']} CPUs, Python {machine['python']} -->",
        "| measure | result | goal |",
        "|---|---|---|",
        *(f"| {m} | {v} | {g} |" for m, v, g in table),
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
