"""Per-call overhead of the local backend, against two baselines in the same run.

(a) ``ProcessPoolExecutor.submit`` on a warm pool: the floor for "another process";
(b) a fresh ``python -c "import cloudpickle"`` per call: the floor for a fresh process
    that can unpickle a call, which is what the local backend starts for each call.

Also: a 1,000-item ``map`` (chunked) against 1,000 single calls.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time

import ascend
from benchmarks._report import median_seconds, write

SEQUENTIAL = 30
FANOUT = 1000


def add(a: int, b: int) -> int:
    return a + b


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CONFIG_HOME"] = os.path.join(tmp, "config")
        ascend.configure(storage=f"file://{tmp}/store", stream_logs=False, progress=False)
        remote_add = ascend.remote(add)
        remote_add(0, 0).result()  # start the scheduler and warm file caches

        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            pool.submit(add, 0, 0).result()
            pool_call = median_seconds(lambda: pool.submit(add, 1, 2).result(), SEQUENTIAL * 10)

        def fresh_process() -> None:
            subprocess.Popen([sys.executable, "-c", "import cloudpickle"]).wait()

        fresh_call = median_seconds(fresh_process, SEQUENTIAL)
        ascend_call = median_seconds(lambda: remote_add(1, 2).result(), SEQUENTIAL)

        start = time.perf_counter()
        futures = [remote_add(i, i) for i in range(FANOUT)]
        assert [f.result() for f in futures] == [2 * i for i in range(FANOUT)]
        singles = time.perf_counter() - start

        start = time.perf_counter()
        assert remote_add.map(range(FANOUT), range(FANOUT)).result() == [
            2 * i for i in range(FANOUT)
        ]
        mapped = time.perf_counter() - start

    figures = {
        "process_pool_call_ms": pool_call * 1e3,
        "fresh_python_import_cloudpickle_ms": fresh_call * 1e3,
        "ascend_local_call_ms": ascend_call * 1e3,
        "ascend_vs_fresh_process": ascend_call / fresh_call,
        "ascend_vs_process_pool": ascend_call / pool_call,
        "single_calls_1000_s": singles,
        "map_1000_s": mapped,
        "map_speedup_vs_single_calls": singles / mapped,
    }
    table = [
        (
            "one call, sequential: ascend local / fresh `python -c 'import cloudpickle'`",
            f"{figures['ascend_vs_fresh_process']:.2f}× ({ascend_call * 1e3:.0f} ms vs {fresh_call * 1e3:.0f} ms)",
            "≤ 1.5×",
        ),
        (
            "one call, sequential: ascend local / warm `ProcessPoolExecutor`",
            f"{figures['ascend_vs_process_pool']:.0f}× ({pool_call * 1e3:.2f} ms)",
            "(reference: no process start)",
        ),
        (
            "1,000 single calls / one 1,000-item map (chunked)",
            f"{figures['map_speedup_vs_single_calls']:.0f}× faster ({singles:.1f} s vs {mapped:.2f} s)",
            "≥ 10×",
        ),
    ]
    write("local", figures, table)


if __name__ == "__main__":
    main()
