"""Following a pod's output through the ``pods/log`` API, resuming without gaps or repeats.

The stream is requested with timestamps. When it ends while the pod still runs (server
or kubelet timeouts after long runs, an apiserver restart), it is requested again from
the last timestamp seen; lines up to and including that timestamp that were already
delivered are skipped, so nothing is lost or repeated.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import anyio

from ascend.backends._kubernetes._client import Api, ApiError
from ascend.backends._kubernetes._spec import CONTAINER

LOG_READ_TIMEOUT = 600.0
_MAX_FAILURES = 30


def _order(stamp: str) -> str:
    """An RFC 3339 timestamp as a string that sorts in time order (Go trims trailing
    zeros from the fraction, so raw strings do not)."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return f"{whole}.{fraction.ljust(9, '0')}"


async def follow(
    api: Api,
    namespace: str,
    pod: str,
    on_line: Callable[[str], None],
    still_running: Callable[[], bool],
) -> None:
    """Deliver every output line of ``pod`` once, until it has stopped and is drained."""
    path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
    last_stamp = ""
    seen_at_last = 0  # lines already delivered with exactly ``last_stamp``
    failures = 0
    while True:
        # A stream opened after the container stopped returns everything that is left
        # and ends: once one such stream is read to its end, nothing can be missing.
        draining = not still_running()
        query: dict[str, object] = {"container": CONTAINER, "follow": True, "timestamps": True}
        if last_stamp:
            query["sinceTime"] = last_stamp[:19] + "Z"  # the API takes whole seconds
        count_at_stamp = 0
        try:
            async for raw in api.stream_lines(path, query, read_timeout=LOG_READ_TIMEOUT):
                raw_stamp, _, text = raw.decode(errors="replace").rstrip("\n").partition(" ")
                stamp = _order(raw_stamp)
                if stamp < last_stamp:
                    continue
                if stamp == last_stamp:
                    count_at_stamp += 1
                    if count_at_stamp <= seen_at_last:
                        continue
                if stamp != last_stamp:
                    last_stamp, count_at_stamp = stamp, 1
                seen_at_last = count_at_stamp
                on_line(text.rstrip("\r"))
        except (ApiError, OSError, TimeoutError, aiohttp.ClientError):  # not started, gone, cut off
            failures += 1
            if failures > _MAX_FAILURES:
                return
        else:
            if draining:
                return
        await anyio.sleep(min(0.2 * (failures + 1), 2.0))
