"""The console: streamed output written off the loop, in order, before outcomes."""

from __future__ import annotations

import asyncio
import io
import sys
import threading

import pytest

from ascend._console import Console


class _SlowOut(io.StringIO):
    """A terminal that takes its time: writes wait until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.release.wait(10)
        return super().write(s)


def test_lines_are_written_prefixed_and_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    console = Console()
    console.write_lines("[a] ", ["1", "2"])
    console.write_lines("[b] ", ["3"])
    console.write("plain\n")
    assert console.flush(5)
    assert out.getvalue() == "[a] 1\n[a] 2\n[b] 3\nplain\n"


def test_printed_waits_until_what_was_queued_before_it_is_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = _SlowOut()
    monkeypatch.setattr(sys, "stdout", out)
    console = Console()

    async def main() -> str:
        ticket = console.write("line\n")
        waiting = asyncio.ensure_future(console.printed(ticket))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the terminal has not taken the line yet
        out.release.set()
        await asyncio.wait_for(waiting, 10)
        return out.getvalue()

    assert asyncio.run(main()) == "line\n"


def test_a_broken_stdout_does_not_stop_later_output(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError

    console = Console()
    monkeypatch.setattr(sys, "stdout", Broken())
    console.write("lost\n")
    assert console.flush(5)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    console.write("kept\n")
    assert console.flush(5)
    assert out.getvalue() == "kept\n"


def test_printed_returns_at_once_when_nothing_is_queued() -> None:
    asyncio.run(asyncio.wait_for(Console().printed(0), 1))


def test_printed_gives_up_after_its_patience_when_the_terminal_takes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = _SlowOut()
    monkeypatch.setattr(sys, "stdout", out)
    console = Console()

    async def main() -> None:
        ticket = console.write("line\n")
        await asyncio.wait_for(console.printed(ticket, patience=0.2), 10)

    try:
        asyncio.run(main())  # returns although the line is still not written
        assert out.getvalue() == ""
    finally:
        out.release.set()
        assert console.flush(5)


def test_the_backlog_counts_what_waits_to_be_written(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _SlowOut()
    monkeypatch.setattr(sys, "stdout", out)
    console = Console()
    console.write_lines("[a] ", ["xyz"])
    assert console.backlog == len("[a] xyz\n")
    out.release.set()
    assert console.flush(5)
    assert console.backlog == 0
