"""The runner as a program: exactly-once publishing and refusals, with real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from ascend import _serialization
from ascend_runner import _storage
from ascend_runner import protocol as p

KEY = b"s" * 32


def _stamp() -> int:
    return time.time_ns()


def _package(tmp_path: Path, fn=_stamp, args: tuple = ()) -> Path:
    path = tmp_path / "package.pkl"
    parts = _serialization.encode("package", {"fn": fn, "args": args, "kwargs": {}}, "test", KEY)
    path.write_bytes(b"".join(bytes(x) for x in parts))
    return path


def _run(package: Path, result: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        p.ENV_PACKAGE_URI: package.as_uri(),
        p.ENV_RESULT_URI: result.as_uri(),
        p.ENV_SIGNING_KEY: KEY.hex(),
        **extra,
    }
    return subprocess.run(
        [sys.executable, "-m", "ascend_runner"], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_second_run_of_the_same_call_never_replaces_the_published_result(tmp_path: Path) -> None:
    package, result = _package(tmp_path), tmp_path / "out" / "result.pkl"
    assert _run(package, result).returncode == p.ExitCode.OK
    first = result.read_bytes()
    second = _run(package, result, ASCEND_ATTEMPT="retry")
    assert second.returncode == p.ExitCode.OK
    assert "already published" in second.stderr
    assert result.read_bytes() == first
    assert [f.name for f in result.parent.iterdir()] == ["result.pkl"], (
        "staging files are cleaned up"
    )


def test_tampered_package_is_refused_before_unpickling(tmp_path: Path) -> None:
    package, result = _package(tmp_path), tmp_path / "result.pkl"
    data = bytearray(package.read_bytes())
    data[-2] ^= 0xFF
    package.write_bytes(bytes(data))
    run = _run(package, result)
    assert run.returncode == p.ExitCode.PACKAGE_UNREADABLE
    assert "signature does not match" in run.stderr
    assert not result.exists()


def test_missing_environment_is_a_reserved_exit_code(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_")}
    run = subprocess.run(
        [sys.executable, "-m", "ascend_runner"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == p.ExitCode.BAD_INVOCATION
    assert p.ENV_PACKAGE_URI in run.stderr


def test_missing_package_is_reported_as_unreadable(tmp_path: Path) -> None:
    run = _run(tmp_path / "nope.pkl", tmp_path / "result.pkl")
    assert run.returncode == p.ExitCode.PACKAGE_UNREADABLE
    assert "cannot read the package" in run.stderr


def test_concurrent_local_publishers_publish_exactly_once(tmp_path: Path) -> None:
    target = (tmp_path / "r.pkl").as_uri()
    winners: list[bool] = []
    barrier = threading.Barrier(8)

    def publish(i: int) -> None:
        barrier.wait()
        winners.append(_storage.publish_once(target, [f"attempt {i}".encode()], {}, f"a{i}"))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert winners.count(True) == 1
    assert (tmp_path / "r.pkl").read_bytes().startswith(b"attempt ")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r.pkl"]


@pytest.mark.parametrize("url", ["file:///x/y.pkl", "/x/y.pkl"])
def test_local_urls_map_to_paths(url: str) -> None:
    assert _storage.local_path(url) == "/x/y.pkl"
    assert _storage.local_path("s3://bucket/x") is None


def _talk() -> str:
    import os
    import sys

    print("from print")
    print("to stderr", file=sys.stderr)
    os.write(1, b"from the file descriptor\n")
    return "done"


def test_output_copy_keeps_everything_written_and_still_passes_it_through(tmp_path: Path) -> None:
    package, result = _package(tmp_path, fn=_talk), tmp_path / "result.pkl"
    logs = tmp_path / "logs"
    run = _run(package, result, ASCEND_LOGS_URI=logs.as_uri(), ASCEND_ATTEMPT="pod-a")
    assert run.returncode == p.ExitCode.OK
    copy = (logs / "pod-a.log").read_text()
    for line in ("from print", "to stderr", "from the file descriptor"):
        assert line in copy
        assert line in run.stdout, "output still reaches the pod's log stream"


def _print_then_exit_abruptly() -> None:
    import os

    for number in range(2000):  # more than a pipe holds: some is in flight at the exit
        print(f"line {number} " + "x" * 100)
    print("last words")
    os._exit(3)


def test_a_function_that_calls_os_exit_loses_none_of_its_output(tmp_path: Path) -> None:
    package = _package(tmp_path, fn=_print_then_exit_abruptly)
    result, logs = tmp_path / "result.pkl", tmp_path / "logs"
    run = _run(package, result, ASCEND_LOGS_URI=logs.as_uri(), ASCEND_ATTEMPT="pod-x")
    assert run.returncode == 3
    assert run.stdout.splitlines()[-1] == "last words", "the pod log gets the last line"
    copy = (logs / "pod-x.log").read_text().splitlines()
    assert copy == run.stdout.splitlines(), "the stored copy is kept, and complete"
    assert not result.exists()


def _print_then_exec() -> None:
    import os
    import sys

    print("before exec")
    os.execv(sys.executable, [sys.executable, "-c", "print('after exec')"])


def test_a_function_that_execs_another_program_loses_no_output(tmp_path: Path) -> None:
    package = _package(tmp_path, fn=_print_then_exec)
    result, logs = tmp_path / "result.pkl", tmp_path / "logs"
    run = _run(package, result, ASCEND_LOGS_URI=logs.as_uri(), ASCEND_ATTEMPT="pod-e")
    assert run.stdout.splitlines() == ["before exec", "after exec"]
    assert "before exec" in (logs / "pod-e.log").read_text(), "the copy is kept up to the exec"
    assert not result.exists()


def _print_then_hang() -> None:
    import time

    print("working on it")
    time.sleep(600)


def test_a_function_stopped_at_its_timeout_keeps_its_output_copy(tmp_path: Path) -> None:
    """The timer's thread and the SIGTERM handler both end the process: one of them
    stores the copy, and the other waits for it."""
    package = _package(tmp_path, fn=_print_then_hang)
    result, logs = tmp_path / "result.pkl", tmp_path / "logs"
    run = _run(
        package, result, ASCEND_LOGS_URI=logs.as_uri(), ASCEND_ATTEMPT="pod-t",
        ASCEND_RUN_TIMEOUT="1",
    )  # fmt: skip
    assert run.returncode == p.ExitCode.DEADLINE
    assert "working on it" in run.stdout
    assert "working on it" in (logs / "pod-t.log").read_text()
    assert "past its timeout" in run.stdout  # the copy passes stderr on merged, as pods log
    assert not result.exists()


def _forks_a_child_that_prints() -> str:
    import multiprocessing

    def child() -> None:
        print("from the forked child", flush=True)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()  # the child ends with os._exit, as multiprocessing's children do
    process.join()
    print("the parent goes on")
    return f"child exited {process.exitcode}"


def test_a_forked_child_that_exits_keeps_the_parents_output_copy(tmp_path: Path) -> None:
    package = _package(tmp_path, fn=_forks_a_child_that_prints)
    result, logs = tmp_path / "result.pkl", tmp_path / "logs"
    run = _run(package, result, ASCEND_LOGS_URI=logs.as_uri(), ASCEND_ATTEMPT="pod-f")
    assert run.returncode == p.ExitCode.OK
    copy = (logs / "pod-f.log").read_text()
    assert "from the forked child" in copy and "the parent goes on" in copy
    assert "could not store" not in run.stderr


def _quiet() -> str:
    return "said nothing"


def test_a_call_that_prints_nothing_leaves_no_output_copy(tmp_path: Path) -> None:
    package, result = _package(tmp_path, fn=_quiet), tmp_path / "result.pkl"
    logs = tmp_path / "logs"
    run = _run(package, result, ASCEND_LOGS_URI=logs.as_uri(), ASCEND_ATTEMPT="pod-q")
    assert run.returncode == p.ExitCode.OK and result.exists()
    assert not logs.exists(), "an empty copy would cost a storage request per call"


def _start(package: Path, result: Path, **popen: object) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        p.ENV_PACKAGE_URI: package.as_uri(),
        p.ENV_RESULT_URI: result.as_uri(),
        p.ENV_SIGNING_KEY: KEY.hex(),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "ascend_runner"], env=env, start_new_session=True, **popen
    )  # type: ignore[call-overload]


def _wait_for(path: Path) -> str:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def _spawn_and_sleep(pid_file: str) -> None:
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(child.pid))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(600)


def test_sigterm_stops_the_function_and_what_it_started_and_publishes_nothing(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "child.pid"
    package = _package(tmp_path, fn=_spawn_and_sleep, args=(str(pid_file),))
    result = tmp_path / "result.pkl"
    runner = _start(package, result, stderr=subprocess.PIPE)
    child = int(_wait_for(pid_file))
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == p.ExitCode.TERMINATED
    assert runner.stderr is not None and b"terminated" in runner.stderr.read()
    assert not result.exists(), "a terminated call must publish nothing"
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(child).wait(timeout=15)
        psutil.Process(child)  # reaped by init, or still a zombie: either way, gone


def _print_after(flag: str) -> str:
    import time

    while not os.path.exists(flag):
        time.sleep(0.05)
    for _ in range(100):
        print("x" * 1000)
    return "printed"


def test_a_closed_output_pipe_is_not_published_as_the_functions_answer(tmp_path: Path) -> None:
    flag = tmp_path / "closed"
    package = _package(tmp_path, fn=_print_after, args=(str(flag),))
    result = tmp_path / "result.pkl"
    runner = _start(package, result, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert runner.stdout is not None and runner.stderr is not None
    runner.stdout.close()
    runner.stderr.close()
    flag.touch()
    assert runner.wait(timeout=60) == p.ExitCode.OUTPUT_LOST
    assert not result.exists(), "BrokenPipeError is the runner's fault, not the answer"


def _cyclic() -> dict:
    value: dict = {}
    value["self"] = value
    return value


def _lock() -> object:
    return threading.Lock()


class _BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def _raise_broken_str() -> None:
    raise _BrokenStr()


def _result(path: Path) -> tuple[str, object]:
    return _serialization.decode(path.read_bytes(), "test", KEY)


def test_a_self_containing_return_value_is_published_intact(tmp_path: Path) -> None:
    package, result = _package(tmp_path, _cyclic), tmp_path / "result.pkl"
    assert _run(package, result).returncode == p.ExitCode.OK
    status, value = _result(result)
    assert status == "ok" and value["self"] is value  # type: ignore[index]


def test_an_unpicklable_return_value_is_published_as_an_ascend_error(tmp_path: Path) -> None:
    package, result = _package(tmp_path, _lock), tmp_path / "result.pkl"
    run = _run(package, result)
    assert run.returncode == p.ExitCode.USER_EXCEPTION, run.stderr
    status, info = _result(result)
    assert status == "error" and info["type"] == p.SERIALIZATION_ERROR  # type: ignore[index]
    assert "Fix:" in info["message"]  # type: ignore[index]


def test_an_exception_whose_str_fails_is_still_published(tmp_path: Path) -> None:
    package, result = _package(tmp_path, _raise_broken_str), tmp_path / "result.pkl"
    assert _run(package, result).returncode == p.ExitCode.USER_EXCEPTION
    status, info = _result(result)
    assert status == "error" and "str() of the exception failed" in info["message"]  # type: ignore[index]
