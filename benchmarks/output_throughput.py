"""Output throughput of the local backend, against a plain pipe in the same run.

A function prints ``MEGABYTES`` MB of 100-byte lines. The baseline runs the same code
in a fresh ``python -c`` whose stdout is a pipe (Python's default buffering, even if
``PYTHONUNBUFFERED`` is set here) that this process reads and writes to a file; ascend runs it as a remote call on the local backend with ``stream_logs=True``,
whose streamed output goes to the same kind of file (``sys.stdout`` redirected). The
ratio of the two wall times is the figure that matters (goal: at most 2x). The CPU
time both spend (this process and its children) is reported too: on a shared machine it
varies less than wall time.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import ascend
from benchmarks._report import write

MEGABYTES = int(os.environ.get("ASCEND_BENCH_OUTPUT_MB", "100"))
LINE = "x" * 99  # with its newline, 100 bytes
REPEAT = 5


def emit(megabytes: int) -> int:
    lines = megabytes * 10_000
    for _ in range(lines):
        print(LINE)
    return lines


_CODE = f"""
LINE = {LINE!r}
def emit(megabytes):
    for _ in range(megabytes * 10_000):
        print(LINE)
emit({MEGABYTES})
"""


# Python's default buffering for a pipe, whatever this shell asks for.
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def _cpu() -> float:
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(run: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of ``run()``."""
    cpu, start = _cpu(), time.perf_counter()
    run()
    return time.perf_counter() - start, _cpu() - cpu


def _plain_pipe(sink: str) -> None:
    with open(sink, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", _CODE], stdout=subprocess.PIPE, env=_ENV)
        assert process.stdout is not None
        while chunk := process.stdout.read1(65536):
            out.write(chunk)
        process.wait()


def _ascend(remote_emit: ascend.RemoteFunction[[int], int], sink: str) -> None:
    with open(sink, "w") as out, contextlib.redirect_stdout(out):
        remote_emit(MEGABYTES).result()


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CONFIG_HOME"] = os.path.join(tmp, "config")
        ascend.configure(storage=f"file://{tmp}/store", stream_logs=True, progress=False)
        remote_emit = ascend.remote(emit)
        sink = os.path.join(tmp, "sink")
        _ascend(remote_emit, sink)  # start the scheduler and warm file caches
        pipes, calls = [], []
        for _ in range(REPEAT):
            pipes.append(_timed(lambda: _plain_pipe(sink)))
            calls.append(_timed(lambda: _ascend(remote_emit, sink)))
        printed = _count_lines(sink)
    (pipe, pipe_cpu), (call, call_cpu) = min(pipes), min(calls)
    expected = MEGABYTES * 10_000
    figures = {
        "megabytes": MEGABYTES,
        "line_bytes": len(LINE) + 1,
        "plain_pipe_s": pipe,
        "ascend_local_s": call,
        "ascend_vs_plain_pipe": call / pipe,
        "plain_pipe_cpu_s": pipe_cpu,
        "ascend_local_cpu_s": call_cpu,
        "ascend_vs_plain_pipe_cpu": call_cpu / pipe_cpu,
        "lines_printed_by_client": printed,
        "lines_expected": expected,
    }
    table = [
        (
            f"printing {MEGABYTES} MB in 100-byte lines: ascend local (streamed) / plain pipe",
            f"{call / pipe:.2f}× ({call:.2f} s vs {pipe:.2f} s)",
            "≤ 2×",
        ),
        (
            "the same, CPU time (both processes) / plain pipe",
            f"{call_cpu / pipe_cpu:.2f}× ({call_cpu:.2f} s vs {pipe_cpu:.2f} s)",
            "(steadier on a shared machine)",
        ),
        (
            "lines printed by the client / lines the function printed",
            f"{printed:,} / {expected:,}",
            "all",
        ),
    ]
    write("output", figures, table)


if __name__ == "__main__":
    main()
