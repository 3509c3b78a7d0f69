"""Following a pod's output through the ``pods/log`` API, resuming without gaps or repeats.

The stream is requested with timestamps and read in pieces, not lines: a line has no
length limit (a runner may print megabytes without a newline) and ends at ``\\n`` only
(a ``\\r`` is part of it). Each line is ``<RFC 3339 timestamp> <output>``; the output
goes on to an :class:`~ascend.backends.ItemOutput`.

When the stream ends while the pod still runs (server or kubelet timeouts after long
runs, an apiserver restart, a cut connection), it is requested again from the last
timestamp seen; lines up to and including that timestamp that were already delivered
are skipped, so nothing is lost or repeated. A line cut off by the end of a stream is
not delivered: the next stream has it whole. A resumed stream can also begin inside a
long line: a real kubelet filters ``sinceTime`` per record of the container runtime
(16 KiB pieces of a line), and stamps only a line's first record, so a line begun
before ``sinceTime`` comes back as its unstamped tail. Such a line came before the last
one delivered, so it was delivered already: it is skipped.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import aiohttp
import anyio

from ascend.backends._kubernetes._client import Api, ApiError
from ascend.backends._kubernetes._spec import CONTAINER

LOG_READ_TIMEOUT = 600.0
_MAX_FAILURES = 30
_STOP_SEEN_WAIT = 5.0  # seconds a cleanly ended stream waits for the watch to see the stop
_STAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


class Output(Protocol):
    """Where the output goes: :class:`ascend.backends.ItemOutput`."""

    def feed(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    async def room(self) -> None: ...


def _order(stamp: str) -> str:
    """An RFC 3339 timestamp as a string that sorts in time order (Go trims trailing
    zeros from the fraction, so raw strings do not)."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return f"{whole}.{fraction.ljust(9, '0')}"


async def drained(
    streams: Mapping[str, anyio.Event], printed_at: Mapping[str, float], quiet: float
) -> None:
    """Wait until the pods' log ``streams`` are over, or none of those still open printed
    for ``quiet`` seconds (``printed_at``: pod name -> ``time.monotonic()`` of its last
    output). A stream that has delivered nothing yet (its first reads failing on a busy
    node) gets three times as long. A stream that cannot be read must not hold the call's
    outcome back for ever."""
    started = time.monotonic()
    while True:
        pending = [name for name, over in streams.items() if not over.is_set()]
        if not pending:
            return
        latest = max(
            printed_at[name] + quiet if name in printed_at else started + 3 * quiet
            for name in pending
        )
        wait = latest - time.monotonic()
        if wait <= 0:
            return
        with anyio.move_on_after(wait):
            await streams[pending[0]].wait()


async def follow(
    api: Api,
    namespace: str,
    pod: str,
    output: Output,
    still_running: Callable[[], bool],
) -> None:
    """Deliver every output line of ``pod`` once, until it has stopped and is drained."""
    path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
    last_stamp = ""
    seen_at_last = 0  # lines already delivered with exactly ``last_stamp``
    failures = 0
    count_at_stamp = 0  # lines with ``last_stamp`` in the current stream

    def deliver(raw: bytes, newline: bytes, batch: list[bytes]) -> None:
        nonlocal last_stamp, seen_at_last, count_at_stamp
        raw_stamp, _, text = raw.partition(b" ")
        if not _STAMP.fullmatch(raw_stamp):
            return  # the unstamped tail of a line delivered before (see the module doc)
        stamp = _order(raw_stamp.decode("ascii"))
        if stamp < last_stamp:
            return
        if stamp == last_stamp:
            count_at_stamp += 1
            if count_at_stamp <= seen_at_last:
                return
        else:
            last_stamp, count_at_stamp = stamp, 1
        seen_at_last = count_at_stamp
        batch += (text, newline)

    while True:
        # A stream opened after the container stopped returns everything that is left
        # and ends: once one such stream is read to its end, nothing can be missing.
        draining = not still_running()
        query: dict[str, object] = {"container": CONTAINER, "follow": True, "timestamps": True}
        if last_stamp:
            query["sinceTime"] = last_stamp[:19] + "Z"  # the API takes whole seconds
        count_at_stamp = 0
        partial: list[bytes] = []
        try:
            async for chunk in api.stream_chunks(path, query, read_timeout=LOG_READ_TIMEOUT):
                cut = chunk.rfind(b"\n")
                if cut < 0:
                    partial.append(chunk)
                    continue
                partial.append(chunk[:cut])
                lines = b"".join(partial).split(b"\n")
                partial = [chunk[cut + 1 :]]
                batch: list[bytes] = []
                for raw in lines:
                    deliver(raw, b"\n", batch)
                output.feed(b"".join(batch))
                await output.room()
        except (ApiError, OSError, TimeoutError, aiohttp.ClientError):  # not started, gone, cut off
            failures += 1
            if failures > _MAX_FAILURES:
                output.end()
                return
        else:
            if draining:
                last = b"".join(partial)
                if last:  # the output ended without a newline
                    batch = []
                    deliver(last, b"", batch)
                    output.feed(b"".join(batch))
                output.end()
                return
            # A follow stream ends when the container stops: wait for the pod's watch to
            # say so before the draining read, rather than reopening the stream every
            # 0.2 s meanwhile (several API requests per call on a real kubelet).
            for _ in range(int(_STOP_SEEN_WAIT / 0.05)):  # local state: no API request
                if not still_running():
                    break
                await anyio.sleep(0.05)
            continue
        await anyio.sleep(min(0.2 * (failures + 1), 2.0))
