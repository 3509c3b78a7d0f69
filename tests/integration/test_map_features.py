"""Maps on the local backend: shared large arguments, parallelism limits, logs, attach."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

import ascend


def _user_folder() -> Path:
    return Path(ascend.configure().user_prefix.removeprefix("file://"))


def _blobs() -> list[Path]:
    folder = _user_folder() / "blobs" / "sha256"
    return sorted(folder.iterdir()) if folder.exists() else []


@ascend.remote
def weigh(i: int, shared: bytes) -> tuple[int, int]:
    return i, len(shared)


def test_a_shared_large_argument_is_stored_once_and_inputs_stay_small() -> None:
    shared = os.urandom(3 * 2**20)
    results = weigh.map(range(40), [shared] * 40, chunksize=1).result(timeout=120)
    assert results == [(i, len(shared)) for i in range(40)]
    blobs = _blobs()
    assert len(blobs) == 1 and blobs[0].stat().st_size == len(shared)
    # 40 small inputs travel inside the package, which only refers to the blob.
    assert not list((_user_folder() / "jobs").glob("*/inputs/*.pkl"))
    (package,) = (_user_folder() / "jobs").glob("*/package.pkl")
    assert package.stat().st_size < 16384, "the bytes were copied into the package"

    # The same bytes again, in another map and in a single call: not uploaded again.
    mtime = blobs[0].stat().st_mtime_ns
    assert weigh.map(range(3), [shared] * 3).result(timeout=120)[2] == (2, len(shared))
    assert weigh(7, shared).result(timeout=60) == (7, len(shared))
    assert _blobs() == blobs and blobs[0].stat().st_mtime_ns == mtime


def test_inputs_too_large_for_the_package_are_stored_per_chunk() -> None:
    rows = [os.urandom(200_000) for _ in range(8)]  # each under the blob threshold
    assert weigh.map(range(8), rows, chunksize=2).result(timeout=120) == [
        (i, 200_000) for i in range(8)
    ]
    inputs = sorted((_user_folder() / "jobs").glob("*/inputs/*.pkl"))
    assert [p.name for p in inputs] == ["0.pkl", "1.pkl", "2.pkl", "3.pkl"]
    assert all(400_000 < p.stat().st_size < 410_000 for p in inputs)
    (package,) = (_user_folder() / "jobs").glob("*/package.pkl")
    assert package.stat().st_size < 16384
    assert not _blobs()


def test_a_large_plain_python_argument_travels_as_one_blob() -> None:
    @ascend.remote
    def total(rows: list[dict[str, int]], scale: int) -> int:
        return scale * sum(r["v"] for r in rows)

    rows = [{"v": i} for i in range(200_000)]  # pickles to well over 1 MiB
    assert total.map([rows] * 5, range(5)).result(timeout=120) == [
        s * sum(range(200_000)) for s in range(5)
    ]
    assert len(_blobs()) == 1


def test_arrays_from_blobs_are_writable_in_the_function() -> None:
    @ascend.remote
    def bump(a: np.ndarray) -> float:
        a += 1  # in place: fails on a read-only buffer
        return float(a.sum())

    array = np.zeros(400_000)
    assert bump(array).result(timeout=60) == 400_000.0
    assert len(_blobs()) == 1


def test_a_tampered_blob_is_refused_before_unpickling() -> None:
    shared = os.urandom(2 * 2**20)
    assert weigh(1, shared).result(timeout=60) == (1, len(shared))
    (blob,) = _blobs()
    blob.write_bytes(b"\0" * len(shared))
    # This process knows the blob is stored, so it is not uploaded again: the runner
    # must notice that its content no longer matches the digest.
    with pytest.raises(ascend.WorkerFailed, match="does not match its digest"):
        weigh(2, shared).result(timeout=60)


def test_blob_threshold_is_configurable() -> None:
    ascend.configure(blob_threshold=64 * 2**20)
    shared = os.urandom(3 * 2**20)
    assert weigh.map(range(2), [shared] * 2).result(timeout=60)[1] == (1, len(shared))
    assert _blobs() == []
    with pytest.raises(ascend.ConfigError, match="blob_threshold"):
        ascend.configure(blob_threshold=0)


@ascend.remote
def crowd(folder: str, i: int) -> int:
    """Count how many items run at once, through marker files."""
    mine = Path(folder) / f"running-{i}"
    mine.touch()
    seen = len(list(Path(folder).glob("running-*")))
    time.sleep(0.3)
    mine.unlink()
    return seen


def test_max_parallel_bounds_how_many_items_run_at_once(tmp_path: Path) -> None:
    ascend.configure(max_workers=8)
    seen = crowd.map([str(tmp_path)] * 12, range(12), chunksize=1, max_parallel=2)
    assert max(seen.result(timeout=120)) <= 2
    with pytest.raises(ascend.ConfigError, match="max_parallel=0 must be a positive integer"):
        crowd.map([str(tmp_path)], [0], max_parallel=0)


def test_chunksize_beyond_the_completion_limit_is_refused_with_a_fix() -> None:
    with pytest.raises(ascend.ConfigError, match=r"chunksize=2 or more"):
        weigh.map(range(150_001), [b""] * 150_001, chunksize=1)


@ascend.remote
def noisy(i: int) -> int:
    print(f"working on {i}")
    if i == 3:
        raise ValueError("three is bad")
    return i


def test_stream_logs_failed_prints_only_the_failing_items_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ascend.configure(stream_logs="failed")
    results = noisy.map(range(6), return_exceptions=True, chunksize=1).result(timeout=120)
    assert isinstance(results[3], ValueError)
    out = capsys.readouterr().out
    assert "working on 3" in out and "three is bad" in out
    assert "working on 2" not in out and "working on 4" not in out
    with pytest.raises(ascend.ConfigError, match="stream_logs must be"):
        ascend.configure(stream_logs="some")


def test_a_finished_map_can_be_attached_and_collected() -> None:
    first = noisy.map(range(5), return_exceptions=True)
    first.exception(timeout=120)
    again = ascend.MapFuture.attach(first.job_id, return_exceptions=True)
    results = again.result(timeout=60)
    assert results[:3] == [0, 1, 2] and results[4] == 4
    assert isinstance(results[3], ValueError)
    assert len(again.futures) == 5
    with pytest.raises(ascend.AscendError, match=r"is a map. Fix: .*MapFuture.attach"):
        ascend.Future.attach(first.job_id).result(timeout=60)
    call = weigh(1, b"x")
    call.result(timeout=60)
    with pytest.raises(ascend.AscendError, match=r"is a call. Fix: .*Future.attach"):
        ascend.MapFuture.attach(call.job_id)
