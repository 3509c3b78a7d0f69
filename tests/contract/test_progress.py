"""Contract: a map's progress counts what its items really do, on every backend."""

from __future__ import annotations

import threading
import time

import ascend
from ascend import Progress
from tests.cluster.shared import Shared


@ascend.remote
def _wait_for(gate: Shared, i: int) -> int:
    """Wait (at most 120 s) until the test creates ``go`` in the shared folder."""
    deadline = time.monotonic() + 120
    while not gate.exists("go") and time.monotonic() < deadline:
        time.sleep(0.1)
    return i


class _Seen:
    def __init__(self) -> None:
        self.snapshots: list[Progress] = []
        self.changed = threading.Condition()

    def __call__(self, p: Progress) -> None:
        with self.changed:
            self.snapshots.append(p)
            self.changed.notify_all()

    def wait_for(self, predicate: object, timeout: float = 120) -> None:
        with self.changed:
            assert self.changed.wait_for(
                lambda: any(predicate(p) for p in self.snapshots),  # type: ignore[operator]
                timeout,
            ), self.snapshots


def test_a_chunk_of_items_counts_as_one_running_item(backend: str, shared: Shared) -> None:
    seen = _Seen()
    mf = _wait_for.map([shared] * 4, range(4), chunksize=2, progress=seen)
    seen.wait_for(lambda p: p.running == 2)
    shared.touch("go")
    assert mf.result(timeout=300) == [0, 1, 2, 3]
    assert max(p.running for p in seen.snapshots) == 2
    assert seen.snapshots[-1] == Progress(total=4, done=4, failed=0, running=0, cancelled=0)


def test_a_cancelled_item_is_counted_as_cancelled_not_failed(backend: str, shared: Shared) -> None:
    seen = _Seen()
    mf = _wait_for.map([shared] * 3, range(3), chunksize=1, return_exceptions=True, progress=seen)
    seen.wait_for(lambda p: p.running >= 1)
    assert mf.futures[1].cancel()
    shared.touch("go")
    results = mf.result(timeout=300)
    assert results[0] == 0 and results[2] == 2
    last = seen.snapshots[-1]
    assert (last.done, last.failed, last.cancelled, last.running) == (2, 0, 1, 0)
