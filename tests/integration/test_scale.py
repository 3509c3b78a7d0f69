"""Many pending calls cost a bounded number of threads and little memory."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import psutil
import pytest

import ascend


@pytest.mark.slow
def test_ten_thousand_pending_calls_do_not_exhaust_threads_or_memory() -> None:
    ascend.configure(max_workers=1)

    @ascend.remote
    def wait_long(i: int) -> int:
        time.sleep(600)
        return i

    ascend.configure()
    process = psutil.Process()
    wait_long(-1).cancel()  # start the scheduler before measuring
    threads_before = threading.active_count()
    rss_before = process.memory_info().rss
    futures = [wait_long(i) for i in range(10_000)]
    threads_peak = threading.active_count()
    rss_after = process.memory_info().rss
    assert not any(f.done() for f in futures)
    for f in futures:
        f.cancel()
    done, not_done = concurrent.futures.wait(futures, timeout=120)
    assert not not_done and all(f.cancelled() for f in done)
    assert threads_peak - threads_before <= 45, "threads must not grow with the number of calls"
    growth_mb = (rss_after - rss_before) / 2**20
    assert growth_mb < 200, f"10,000 pending calls cost {growth_mb:.0f} MB"
