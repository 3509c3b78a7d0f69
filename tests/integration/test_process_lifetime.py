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


def test_sigkill_of_the_client_stops_its_runners(tmp_path: Path) -> None:
    client, runner_pid, _ = _start(tmp_path, detach=False, seconds=600, mode="wait")
    client.send_signal(signal.SIGKILL)
    client.wait(timeout=60)
    assert _gone_within(runner_pid, 15), "the runner outlived its SIGKILLed client"


def test_sigterm_of_the_client_cancels_its_calls_like_ctrl_c(tmp_path: Path) -> None:
    client, runner_pid, _ = _start(tmp_path, detach=False, seconds=600, mode="wait")
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=60) == 128 + signal.SIGTERM
    assert _gone_within(runner_pid, 15), "SIGTERM left the remote work running"


def test_sigterm_of_the_client_leaves_detached_calls_running(tmp_path: Path) -> None:
    client, runner_pid, _ = _start(tmp_path, detach=True, seconds=600, mode="wait")
    try:
        client.send_signal(signal.SIGTERM)
        client.wait(timeout=60)
        assert not _gone_within(runner_pid, 2), "a detached call was stopped by SIGTERM"
    finally:
        os.killpg(os.getpgid(runner_pid), signal.SIGKILL)  # the detached launcher's group


QUICK_EXIT = textwrap.dedent(
    """
    import sys
    import ascend

    ascend.configure(stream_logs=False, detach=True)

    @ascend.remote
    def work(x):
        return x * 2

    print(work(21).job_id, flush=True)
    """
)


def test_a_detached_call_is_durable_when_the_script_exits_right_after_it(
    tmp_path: Path, isolated_ascend: Path
) -> None:
    script = tmp_path / "client.py"
    script.write_text(QUICK_EXIT)
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    job_id = run.stdout.strip()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if list((isolated_ascend / "cache" / "ascend").rglob(f"jobs/{job_id}/result.pkl")):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the detached call never published its result")


def test_what_a_function_leaves_running_is_stopped_when_its_call_resolves() -> None:
    import ascend

    @ascend.remote
    def leave_a_child() -> int:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid

    child = leave_a_child().result(timeout=60)
    assert _gone_within(child, 15), "a process the function started outlived its call"
