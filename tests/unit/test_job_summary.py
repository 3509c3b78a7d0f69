"""How a job's state is summarised: what ``ascend jobs list/status`` says (a published
result's status read from its first bytes; a job's state and item counts from its
results and Job), and a map future's repr."""

from __future__ import annotations

from typing import Any

import pytest

import ascend
from ascend import _serialization
from ascend._cli._jobs import _summary
from ascend_runner import protocol
from ascend_runner.__main__ import _outcome

KEY = b"k" * 32


def _published(fn: Any, *args: Any) -> bytes:
    """The bytes the runner publishes for ``fn(*args)``."""
    parts, _ = _outcome(fn, args, {}, KEY)
    return b"".join(bytes(p) for p in parts)


def _raise(x: int) -> int:
    raise ValueError(x)


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("no")


@pytest.mark.parametrize(
    ("fn", "arg", "status"),
    [
        (abs, -3, "ok"),
        (_raise, 1, "error"),
        (lambda n: b"x" * n, 8 << 20, "ok"),  # its bytes lie far past the head
        (lambda n: list(range(n)), 300_000, "ok"),  # a pickle larger than the head
        (lambda _: _Unpicklable(), 0, "error"),  # published as an error by the runner
    ],
    ids=["value", "exception", "large-bytes", "large-pickle", "unpicklable-value"],
)
def test_a_published_results_status_is_read_from_its_first_bytes(
    fn: Any, arg: Any, status: str
) -> None:
    data = _published(fn, arg)
    assert _serialization.peek_status(data[: _serialization.STATUS_HEAD]) == status


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"not an envelope",
        _published(abs, 1)[:20],  # cut inside the header
        b"".join(bytes(p) for p in protocol.encode("package", b"\x80\x05N.")),
    ],
    ids=["empty", "not-an-envelope", "truncated-header", "a-package"],
)
def test_bytes_that_do_not_say_give_no_status(head: bytes) -> None:
    assert _serialization.peek_status(head) is None


MAP_META = {"kind": "map", "items": 4, "units": [[0, 2], [2, 4]]}


def _job(*, failed_indexes: str = "", active: int = 0, failed: bool = False) -> dict[str, Any]:
    conditions = [{"type": "Failed" if failed else "Complete", "status": "True"}]
    status: dict[str, Any] = {"failedIndexes": failed_indexes}
    if active:
        status["active"] = active
    else:
        status["conditions"] = conditions
    return {"status": status}


def test_a_map_whose_items_all_returned_succeeded() -> None:
    statuses = dict.fromkeys(range(4), "ok")
    assert _summary("map", 4, MAP_META, None, statuses) == ("succeeded", 4, 0)


def test_a_map_with_items_that_raised_is_failed_with_its_counts() -> None:
    statuses = {0: "ok", 1: "error", 2: "ok", 3: "error"}
    assert _summary("map", 4, MAP_META, None, statuses) == ("failed", 2, 2)
    assert _summary("map", 4, MAP_META, _job(failed_indexes="0,1"), statuses) == ("failed", 2, 2)


def test_a_map_that_stopped_at_its_first_failure_is_failed_not_cancelled() -> None:
    assert _summary("map", 4, MAP_META, None, {0: "ok", 1: "error"}) == ("failed", 1, 1)


def test_items_of_a_failed_index_that_published_nothing_count_as_failed() -> None:
    job = _job(failed_indexes="1", failed=True)
    assert _summary("map", 4, MAP_META, job, {0: "ok", 1: "ok"}) == ("failed", 2, 2)


def test_a_running_map_is_running_with_its_counts_so_far() -> None:
    job = _job(active=2)
    assert _summary("map", 4, MAP_META, job, {0: "ok", 3: "error"}) == ("running", 1, 1)


def test_published_results_decide_before_the_job_is_marked_finished() -> None:
    job = _job(active=1)
    assert _summary("map", 4, MAP_META, job, dict.fromkeys(range(4), "ok")) == ("succeeded", 4, 0)
    assert _summary("call", 1, {"kind": "call"}, job, {0: "error"}) == ("failed", 0, 1)


def test_a_map_missing_items_without_a_failure_is_cancelled() -> None:
    assert _summary("map", 4, MAP_META, None, {0: "ok"}) == ("cancelled", 1, 0)


def test_a_map_with_a_result_that_cannot_be_read_is_finished() -> None:
    statuses = {0: "ok", 1: "unknown", 2: "ok", 3: "ok"}
    assert _summary("map", 4, MAP_META, None, statuses) == ("finished", 4, 0)


def test_a_call_whose_pod_failed_without_a_result_is_failed() -> None:
    meta = {"kind": "call", "items": 1}
    assert _summary("call", 1, meta, _job(failed=True), {}) == ("failed", 0, 1)
    assert _summary("call", 1, meta, None, {0: "error"}) == ("failed", 0, 1)
    assert _summary("call", 1, meta, None, {}) == ("cancelled", 0, 0)


def test_a_maps_repr_counts_the_items_that_failed_and_were_cancelled() -> None:
    items: list[ascend.Future[int]] = [ascend.Future("m-1", f"f[{i}]") for i in range(4)]
    mapped = ascend.MapFuture("m-1", "f", items, return_exceptions=True)
    items[0]._resolve(1)
    items[1]._fail(ValueError("x"))
    items[2].cancel()
    assert "done=3/4 failed=1 cancelled=1 state=running" in repr(mapped)
    items[3]._fail(ValueError("y"))
    assert "done=4/4 failed=2 cancelled=1 state=finished" in repr(mapped)
