"""Contract: what a function prints reaches the client whole, in order, and attributed.

Lines end at ``\\n`` only; a line has no length limit; a ``\\r`` is part of its line;
bytes that are not UTF-8 are replaced (U+FFFD); stdout, stderr and child processes all
count; output without a final newline is the last line. Streamed output
(``stream_logs=True``) is printed, prefixed with the job id, before the call's result is
returned, and ``fut.logs()`` holds exactly what the call printed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import ascend
from tests.cluster.shared import Shared

LINES = 20_000  # ~0.9 MB: many reads of the runner's pipe and of a pod's log stream
BIG = 5 << 20


@ascend.remote
def _count(n: int) -> int:
    for i in range(n):
        print(f"line {i:06d} " + "x" * 30)
    return n


@ascend.remote
def _mixed() -> str:
    print("to stdout")
    print("to stderr", file=sys.stderr)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; print('from a child'); print('child err', file=sys.stderr)",
        ],
        check=True,
    )
    print("progress 10%\rprogress 50%\rprogress 100%")
    sys.stdout.buffer.write(b"not utf-8: \xff\xfe!\n")
    print("then stdout", end="")
    print(" and stderr", file=sys.stderr)
    sys.stdout.write("no newline at the end")
    return "ok"


@ascend.remote
def _big_line(size: int) -> int:
    sys.stdout.write("A" * size + "\n")
    print("after the big line")
    return size


@ascend.remote
def _item_output(i: int) -> int:
    """Each item prints its own kind of output; some end without a newline."""
    kind = i % 4
    if kind == 0:
        print(f"item {i} line 1")
        print(f"item {i} line 2")
    elif kind == 1:
        sys.stdout.write(f"item {i} without newline")
    elif kind == 2:
        sys.stdout.write(f"item {i} " + "L" * 200_000)
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(f"item {i} binary ".encode() + b"\xff\x00\xfe")
    return i


def _expected_item_output(i: int) -> list[str]:
    kind = i % 4
    if kind == 0:
        return [f"item {i} line 1", f"item {i} line 2"]
    if kind == 1:
        return [f"item {i} without newline"]
    if kind == 2:
        return [f"item {i} " + "L" * 200_000]
    return [f"item {i} binary \ufffd\x00\ufffd"]


def _printed(capsys: pytest.CaptureFixture[str], job_id: str) -> list[str]:
    prefix = f"[{job_id}] "
    out = capsys.readouterr().out
    return [line[len(prefix) :] for line in out.split("\n") if line.startswith(prefix)]


def test_every_streamed_line_is_printed_before_the_result_returns(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ascend.configure(stream_logs=True)
    fut = _count(LINES)
    assert fut.result(timeout=300) == LINES
    printed = _printed(capsys, fut.job_id)
    assert printed == [f"line {i:06d} " + "x" * 30 for i in range(LINES)]


def test_logs_hold_every_line_up_to_the_last(backend: str) -> None:
    ascend.configure(stream_logs=False)
    fut = _count(LINES)
    fut.result(timeout=300)
    lines = list(fut.logs())
    assert len(lines) == LINES
    assert lines[-1] == f"line {LINES - 1:06d} " + "x" * 30


def test_stderr_children_carriage_returns_binary_and_a_last_partial_line_arrive_in_order(
    backend: str,
) -> None:
    ascend.configure(stream_logs=False)
    fut = _mixed()
    assert fut.result(timeout=300) == "ok"
    assert list(fut.logs()) == [
        "to stdout",
        "to stderr",
        "from a child",
        "child err",
        "progress 10%\rprogress 50%\rprogress 100%",
        "not utf-8: \ufffd\ufffd!",
        "then stdout and stderr",
        "no newline at the end",
    ]


def test_a_line_of_several_megabytes_arrives_whole_and_what_follows_too(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ascend.configure(stream_logs=True)
    fut = _big_line(BIG)
    assert fut.result(timeout=300) == BIG
    assert _printed(capsys, fut.job_id) == ["A" * BIG, "after the big line"]
    assert list(fut.logs()) == ["A" * BIG, "after the big line"]


@pytest.mark.parametrize("chunksize", [1, 4])
def test_a_map_items_logs_hold_exactly_its_own_output(backend: str, chunksize: int) -> None:
    ascend.configure(stream_logs=True)
    n = 8
    mf = _item_output.map(range(n), chunksize=chunksize)
    assert mf.result(timeout=300) == list(range(n))
    for i in range(n):
        assert list(mf.futures[i].logs()) == _expected_item_output(i), f"item {i}"


@pytest.mark.parametrize("chunksize", [1, 4])
def test_a_maps_logs_are_its_items_output_in_input_order(backend: str, chunksize: int) -> None:
    n = 6
    mf = _item_output.map(range(n), chunksize=chunksize)
    followed = list(mf.logs())  # while it runs: each item's lines until it ends
    expected = [line for i in range(n) for line in _expected_item_output(i)]
    assert followed == expected
    assert mf.result(timeout=300) == list(range(n))
    assert list(mf.logs()) == expected


@pytest.mark.anyio
async def test_a_maps_logs_iterate_asynchronously_in_input_order(backend: str) -> None:
    mf = _item_output.map(range(3))
    assert await mf == [0, 1, 2]
    lines = [line async for line in mf.logs()]
    assert lines == [line for i in range(3) for line in _expected_item_output(i)]


@pytest.mark.parametrize("chunksize", [1, 4])
def test_a_map_items_stored_output_holds_exactly_its_own_output(
    backend: str, chunksize: int
) -> None:
    ascend.configure(stream_logs="failed")
    n = 8
    mf = _item_output.map(range(n), chunksize=chunksize)
    assert mf.result(timeout=300) == list(range(n))
    for i in range(n):
        assert list(mf.futures[i].logs()) == _expected_item_output(i), f"item {i}"


@ascend.remote
def _print_then_wait(gate: Shared) -> str:
    import time

    print("first line")
    deadline = time.monotonic() + 120
    while not gate.exists("release") and time.monotonic() < deadline:
        time.sleep(0.1)
    print("last line")
    return "done"


def test_a_line_is_readable_while_the_call_still_runs(backend: str, shared: Shared) -> None:
    ascend.configure(stream_logs=False)
    fut = _print_then_wait(shared)
    lines = iter(fut.logs())
    assert next(lines) == "first line"
    assert not fut.done()
    shared.touch("release")
    assert list(lines) == ["last line"]
    assert fut.result(timeout=300) == "done"


@ascend.remote
def _print_then_raise() -> None:
    print("before the error")
    sys.stdout.write("no newline before the error")
    raise ValueError("boom")


@ascend.remote
def _print_then_exit() -> None:
    import os

    print("last words")
    os._exit(3)


def test_the_output_of_a_call_that_raises_is_kept_to_its_last_line(backend: str) -> None:
    ascend.configure(stream_logs=False)
    fut = _print_then_raise()
    with pytest.raises(ValueError, match="boom"):
        fut.result(timeout=300)
    assert list(fut.logs()) == ["before the error", "no newline before the error"]


def test_the_output_of_a_process_that_exits_abruptly_is_kept(backend: str) -> None:
    ascend.configure(stream_logs=False)
    fut = _print_then_exit()
    with pytest.raises(ascend.AscendError):
        fut.result(timeout=300)
    assert "last words" in list(fut.logs())


@pytest.mark.parametrize("stream_logs", [True, "failed"])
def test_a_failing_calls_output_is_printed_before_its_error_is_raised(
    backend: str, stream_logs: bool | str, capsys: pytest.CaptureFixture[str]
) -> None:
    ascend.configure(stream_logs=stream_logs)
    fut = _print_then_raise()
    with pytest.raises(ValueError, match="boom"):
        fut.result(timeout=300)
    printed = capsys.readouterr().out.split("\n")
    tag = f"[{fut.job_id}]"
    assert f"{tag} before the error" in printed
    assert f"{tag} no newline before the error" in printed
