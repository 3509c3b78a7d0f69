"""The runner as a program: exactly-once publishing and refusals, with real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def _quiet() -> str:
    return "said nothing"


def test_a_call_that_prints_nothing_leaves_no_output_copy(tmp_path: Path) -> None:
    package, result = _package(tmp_path, fn=_quiet), tmp_path / "result.pkl"
    logs = tmp_path / "logs"
    run = _run(package, result, ASCEND_LOGS_URI=logs.as_uri(), ASCEND_ATTEMPT="pod-q")
    assert run.returncode == p.ExitCode.OK and result.exists()
    assert not logs.exists(), "an empty copy would cost a storage request per call"
