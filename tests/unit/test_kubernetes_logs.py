"""The pods/log follower against scripted streams (what a real kubelet sends)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from ascend.backends._kubernetes import _logs

pytestmark = pytest.mark.anyio

T1 = b"2026-11-30T23:33:57.286369249Z"
T2 = b"2026-11-30T23:34:01.132806579Z"


class _Api:
    """Answers each log request with the next scripted stream; records the queries."""

    def __init__(self, streams: list[list[bytes]]) -> None:
        self.streams = streams
        self.queries: list[dict[str, Any]] = []

    async def stream_chunks(
        self, path: str, query: Mapping[str, Any], *, read_timeout: float
    ) -> AsyncIterator[bytes]:
        self.queries.append(dict(query))
        for chunk in self.streams[min(len(self.queries), len(self.streams)) - 1]:
            yield chunk


class _Output:
    def __init__(self) -> None:
        self.data = b""
        self.ended = False

    def feed(self, data: bytes) -> None:
        self.data += data

    def end(self) -> None:
        self.ended = True

    async def room(self) -> None:
        return None


async def test_a_resumed_stream_that_begins_inside_a_long_line_repeats_and_adds_nothing() -> None:
    """A real kubelet resumed with sinceTime sends a long line begun earlier as its
    unstamped tail (it filters the runtime's 16 KiB records, and stamps a line's first)."""
    whole = b"a" * 100 + b"b" * 100
    first = [T1 + b" " + whole[:50], whole[50:] + b"\n" + T2 + b" next line\n"]
    resumed = [whole[120:] + b"\n" + T2 + b" next line\n"]
    api = _Api([first, resumed])
    # Running when the first stream opens; once it has ended, the pod's watch says the
    # container stopped, and the one draining read resumes inside the long line.
    states = iter([True])
    output = _Output()
    await _logs.follow(api, "ns", "pod", output, lambda: next(states, False))  # type: ignore[arg-type]
    assert output.data == whole + b"\nnext line\n"
    assert output.ended
    assert [q.get("sinceTime") for q in api.queries] == [None, "2026-11-30T23:34:01Z"]


async def test_a_stream_that_ends_while_running_waits_for_the_stop_not_the_api() -> None:
    """A follow stream ends when the container stops; until the pod's watch says so the
    follower reads its own state, not the API: one stream, then one draining read."""
    line = [T1 + b" only line\n"]
    api = _Api([line, line])
    checks = iter([True, True, True, True])  # the watch sees the stop a little later
    output = _Output()
    await _logs.follow(api, "ns", "pod", output, lambda: next(checks, False))  # type: ignore[arg-type]
    assert output.data == b"only line\n"
    assert len(api.queries) == 2
