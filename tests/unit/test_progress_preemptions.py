"""A map's progress counts items the cluster took away and ran again."""

from __future__ import annotations

from ascend._future import Future
from ascend._progress import Progress, Tracker


def test_a_preempted_item_is_counted_and_no_longer_running() -> None:
    seen: list[Progress] = []
    tracker = Tracker(3, seen.append)
    tracker.started(range(0, 1))
    tracker.started(range(1, 2))
    tracker.preempted(range(1, 2))
    assert seen[-1] == Progress(total=3, done=0, failed=0, running=1, preempted=1)
    assert seen[-1].pending == 2
    tracker.started(range(1, 2))  # its replacement starts
    assert (seen[-1].running, seen[-1].preempted) == (2, 1)


def test_a_future_starts_with_no_preemptions() -> None:
    assert Future("f-0123456789", "f").preemptions == 0
