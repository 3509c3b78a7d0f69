"""A Jupyter kernel restart stops the calls its kernel started (local backend)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import psutil
import pytest
from jupyter_client.manager import KernelManager

SUBMIT = """
import os, time
import ascend
ascend.configure(stream_logs=False, progress=False)

@ascend.remote
def work(pid_file):
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(600)

fut = work({pid_file!r})
"""


@pytest.mark.slow
@pytest.mark.parametrize("now", [False, True], ids=["graceful", "killed"])
def test_restarting_the_kernel_stops_its_runners(tmp_path: Path, now: bool) -> None:
    pid_file = tmp_path / "runner.pid"
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel()
    try:
        client = manager.client()
        client.start_channels()
        client.wait_for_ready(timeout=60)
        reply = client.execute_interactive(SUBMIT.format(pid_file=str(pid_file)), timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert time.monotonic() < deadline, "the runner never started"
            time.sleep(0.1)
        runner = psutil.Process(int(pid_file.read_text()))
        client.stop_channels()
        # now=True kills the kernel (SIGKILL), as a restart does when it will not stop.
        manager.restart_kernel(now=now)
        with contextlib.suppress(psutil.NoSuchProcess):
            runner.wait(timeout=30)
        assert not runner.is_running(), "the runner outlived its kernel"
    finally:
        manager.shutdown_kernel(now=True)
