"""Contract: attaching to a job by its id — from this process or another one.

Every backend: ``Future.attach`` and ``MapFuture.attach`` read the job's ``meta.json``
before they return, so every kind of wrong id fails at the attach, with the error that
names it: an id of no job, a string no job id can be, a map attached as a call (and the
reverse), a job folder whose description is unreadable. A right id attaches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fsspec
import pytest

import ascend
from ascend import _config

_WAIT = 120  # seconds any one call may take on a slow backend (a pod start)

ATTACH: dict[str, Callable[[Any], ascend.Future[Any]]] = {
    "Future": ascend.Future.attach,
    "MapFuture": ascend.MapFuture.attach,
}


@ascend.remote
def _square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("attach", ATTACH.values(), ids=ATTACH.keys())
def test_attaching_an_id_of_no_job_raises_no_such_job_at_the_attach(
    backend: str, attach: Callable[[str], Any]
) -> None:
    with pytest.raises(ascend.NoSuchJob, match="no job 'nothing-0000000000'") as info:
        attach("nothing-0000000000")
    assert info.value.job_id == "nothing-0000000000"


# Strings no job id can be: whitespace pasted along, paths, capitals, too long, empty.
NOT_IDS = ["", " train-1", "train-1\n", "../train-1", "a/b", "Train-1", "x" * 64, "-a", "a_b"]


@pytest.mark.parametrize("attach", ATTACH.values(), ids=ATTACH.keys())
@pytest.mark.parametrize("job_id", NOT_IDS)
def test_attaching_a_string_no_job_id_can_be_raises_no_such_job_naming_the_form(
    backend: str, attach: Callable[[str], Any], job_id: str
) -> None:
    with pytest.raises(ascend.NoSuchJob, match="is not an ascend job id.*Fix: copy the id"):
        attach(job_id)


@pytest.mark.parametrize("attach", ATTACH.values(), ids=ATTACH.keys())
@pytest.mark.parametrize("job_id", [None, 12, b"train-1"])
def test_attaching_a_non_string_raises_type_error(
    backend: str, attach: Callable[[Any], Any], job_id: object
) -> None:
    with pytest.raises(TypeError, match="a job id is a str"):
        attach(job_id)


def test_attaching_a_map_as_a_call_raises_at_the_attach_naming_map_future(backend: str) -> None:
    mapped = _square.map([3])
    assert mapped.result(timeout=_WAIT) == [9]
    with pytest.raises(ascend.AscendError, match=r"is a map\. Fix: .*MapFuture\.attach"):
        ascend.Future.attach(mapped.job_id)
    assert ascend.MapFuture.attach(mapped.job_id).result(timeout=_WAIT) == [9]


def test_attaching_a_call_as_a_map_raises_at_the_attach_naming_future(backend: str) -> None:
    call = _square(4)
    assert call.result(timeout=_WAIT) == 16
    with pytest.raises(ascend.AscendError, match=r"is a call\. Fix: .*Future\.attach"):
        ascend.MapFuture.attach(call.job_id)
    again = ascend.Future.attach(call.job_id)
    assert again.result(timeout=_WAIT) == 16
    assert "_square" in repr(again), "an attached call is named by its function"


def _write_meta(job_id: str, data: bytes) -> None:
    settings = _config.current()
    url = f"{settings.user_prefix}/jobs/{job_id}/meta.json"
    with fsspec.open(url, "wb", **settings.storage_options) as f:
        f.write(data)


UNREADABLE = {
    "not-json": (b"{not json", "is not JSON"),
    "not-an-object": (b"[1, 2]", "holds a list"),
    "no-function": (
        b'{"kind": "call", "items": 1, "units": [[0, 1]], "backend": "local"}',
        "'function' is missing",
    ),
}


@pytest.mark.parametrize("attach", ATTACH.values(), ids=ATTACH.keys())
@pytest.mark.parametrize("content", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_attaching_a_job_whose_meta_json_is_unreadable_raises_at_the_attach(
    backend: str, attach: Callable[[str], Any], content: tuple[bytes, str]
) -> None:
    data, why = content
    _write_meta("broken-0000000000", data)
    with pytest.raises(ascend.AscendError, match=f"cannot be read.*{why}.*Fix:"):
        attach("broken-0000000000")


@ascend.remote
def _third_raises(x: int) -> int:
    if x == 2:
        raise ValueError("item 2")
    return x * 10


def test_attaching_a_finished_map_with_a_failed_item_keeps_every_stored_result(
    backend: str,
) -> None:
    mapped = _third_raises.map([0, 1, 2], return_exceptions=True)
    assert [type(r).__name__ for r in mapped] == ["int", "int", "ValueError"]
    for _ in range(5):  # the order results were read in once decided the outcome
        attached = ascend.MapFuture.attach(mapped.job_id)
        with pytest.raises(ValueError, match="item 2"):
            attached.result(timeout=_WAIT)
        assert [f.result(timeout=_WAIT) for f in attached.futures[:2]] == [0, 10]
        assert not any(f.cancelled() for f in attached.futures)


def test_an_attached_finished_job_is_done_when_attach_returns(backend: str) -> None:
    call = _square(3)
    assert call.result(timeout=_WAIT) == 9
    attached = ascend.Future.attach(call.job_id)
    assert attached.done() and "state=finished" in repr(attached)
    mapped = _third_raises.map([0, 1, 2], return_exceptions=True)
    list(mapped)
    attached_map = ascend.MapFuture.attach(mapped.job_id, return_exceptions=True)
    assert attached_map.done()
    assert "done=3/3 failed=1 state=finished" in repr(attached_map)


@ascend.remote
def _chatty(x: int) -> int:
    print(f"chatty says {x}", flush=True)
    return x


def test_an_attached_finished_detached_call_has_its_output(backend: str) -> None:
    ascend.configure(detach=True)
    fut = _chatty(7)
    assert fut.result(timeout=_WAIT) == 7
    attached = ascend.Future.attach(fut.job_id)
    assert attached.result(timeout=_WAIT) == 7
    assert "chatty says 7" in list(attached.logs())
    assert "chatty says 7" in list(ascend.Future.attach(fut.job_id).logs())
