"""Progress counts and the bar's coexistence with streamed output."""

from __future__ import annotations

import io
import sys
import warnings

import pytest

from ascend import _console, _progress
from ascend._progress import Progress, Tracker


def _tracker(total: int) -> tuple[Tracker, list[Progress]]:
    seen: list[Progress] = []
    return Tracker(total, seen.append), seen


def test_cancelled_items_are_counted_as_cancelled_not_failed() -> None:
    tracker, seen = _tracker(3)
    tracker.item_done(0, "done")
    tracker.item_done(1, "cancelled")
    tracker.item_done(2, "failed")
    assert seen[-1] == Progress(total=3, done=1, failed=1, running=0, cancelled=1)
    assert seen[-1].pending == 0


def test_a_chunk_of_several_items_counts_as_one_running_item() -> None:
    tracker, seen = _tracker(6)
    tracker.started(range(0, 3))
    tracker.started(range(3, 6))
    assert seen[-1].running == 2 and seen[-1].pending == 4
    for i in range(3):
        tracker.item_done(i, "done")
    assert seen[-1].running == 1 and seen[-1].done == 3 and seen[-1].pending == 2


def test_a_retried_chunk_is_not_counted_twice() -> None:
    tracker, seen = _tracker(2)
    tracker.started(range(0, 2))
    tracker.started(range(0, 2))
    assert seen[-1].running == 1


def test_an_item_reported_twice_is_counted_once() -> None:
    tracker, seen = _tracker(2)
    tracker.item_done(0, "done")
    tracker.item_done(0, "cancelled")
    assert len(seen) == 1 and seen[-1].done == 1 and seen[-1].cancelled == 0


def test_streamed_output_is_printed_above_the_bar_not_glued_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = io.StringIO()  # stdout and stderr on one terminal, as in a shell
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = _progress._Bar(2, "job")
    try:
        bar(Progress(total=2, done=1, failed=0, running=1))
        _console.console.write("[job-1] hello\n")
        assert _console.console.flush(5)
    finally:
        bar(Progress(total=2, done=2, failed=0, running=0))
    text = terminal.getvalue()
    before = text[: text.index("[job-1] hello\n")]
    assert before.endswith(("\r", "\n"))  # the bar was cleared, the line starts afresh
    assert "1/2" in before


def test_in_jupyter_without_ipywidgets_the_bar_is_text_and_nothing_warns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules[__name__])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ipywidgets" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bar = _progress._Bar(1, "job")
        bar(Progress(total=1, done=1, failed=0, running=0))
    from tqdm.std import tqdm

    assert type(bar._bar) is tqdm
