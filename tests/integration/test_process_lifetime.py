"""What happens to remote work when the calling process exits or is interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import ascend

    ascend.configure(stream_logs=False, detach={detach})

    @ascend.remote
    def work(pid_file, seconds):
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(pid_file + ".tmp", pid_file)
        time.sleep(seconds)
        return "finished"

    fut = work(sys.argv[1], float(sys.argv[2]))
    print(fut.job_id, flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.02)
    print("running", flush=True)
    if sys.argv[3] == "wait":
        fut.result()
    """
)


def _start(
    tmp_path: Path, *, detach: bool, seconds: float, mode: str
) -> tuple[subprocess.Popen[str], int, str]:
    script = tmp_path / "client.py"
    script.write_text(SCRIPT.format(detach=detach))
    pid_file = tmp_path / "runner.pid"
    client = subprocess.Popen(
        [sys.executable, str(script), str(pid_file), str(seconds), mode],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert client.stdout is not None
    job_id = client.stdout.readline().strip()
    assert client.stdout.readline().strip() == "running"
    return client, int(pid_file.read_text()), job_id


def _gone_within(pid: int, seconds: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout=seconds)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def test_normal_exit_cancels_pending_calls_and_stops_their_processes(tmp_path: Path) -> None:
    client, runner_pid, _ = _start(tmp_path, detach=False, seconds=600, mode="exit")
    assert client.wait(timeout=60) == 0
    assert _gone_within(runner_pid, 15), "the runner outlived its client"


def test_ctrl_c_while_waiting_cancels_the_call(tmp_path: Path) -> None:
    client, runner_pid, _ = _start(tmp_path, detach=False, seconds=600, mode="wait")
    time.sleep(0.2)
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=60) != 0
    assert _gone_within(runner_pid, 15), "Ctrl-C left the remote work running"


def test_detached_calls_survive_exit_and_publish_their_result(
    tmp_path: Path, isolated_ascend: Path
) -> None:
    client, runner_pid, job_id = _start(tmp_path, detach=True, seconds=3, mode="exit")
    assert client.wait(timeout=60) == 0
    assert psutil.pid_exists(runner_pid), "a detached call was stopped at exit"
    assert _gone_within(runner_pid, 60)
    results = list((isolated_ascend / "cache" / "ascend").rglob(f"jobs/{job_id}/result.pkl"))
    assert len(results) == 1
