"""The tracker, fed the recorded watch events of each scenario in the order the API
server wrote them, reports each outcome to its observer once and correctly."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import ascend
from ascend._config import Settings
from ascend._resources import Resources
from ascend.backends import Job
from ascend.backends._kubernetes import _logs, _Tracker
from tests.jobs import a_job

FIXTURES = Path(__file__).parent / "fixtures" / "k8s"
pytestmark = pytest.mark.anyio


def _job(
    job_id: str, name: str, *, items: int = 1, resources: Resources | None = None, **settings: Any
) -> Job:
    """A call (``items=1``) or a map of one item per index, with test settings."""
    return a_job(
        Settings(storage="file:///tmp/unused", **settings),
        job_id=job_id,
        name=name,
        items=items,
        resources=resources,
    )


class Observer:
    """Records what the tracker reports."""

    def __init__(self) -> None:
        self.done: list[int] = []
        self.errors: dict[int, ascend.AscendError] = {}
        self.running: list[int] = []
        self.preemptions: list[tuple[int, int]] = []

    def log(self, item: int, line: str) -> None:
        pass

    def started(self, items: range) -> None:
        self.running.extend(items)

    def finished(self, items: range) -> None:
        self.done.extend(items)

    def failed(self, items: range, error: ascend.AscendError) -> None:
        for i in items:
            assert i not in self.errors, "an item failed twice"
            self.errors[i] = error

    def wanted(self, items: range) -> bool:
        return True

    def output_copies(self, items: range, urls: list[str]) -> None:
        pass

    def output_on_request(self, follow: Any) -> None:
        pass

    def preempted(self, items: range, count: int, reason: str) -> None:
        self.preemptions.extend((i, count) for i in items)


class Namespace:
    log_streams = anyio.Semaphore(8)
    api = None
    namespace = "ascend-e2e"


def _events(name: str) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """The scenario's job id and its objects' versions, in the server's write order."""
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    job_id = max(data["jobs"], key=lambda j: j["metadata"]["creationTimestamp"])["metadata"]["name"]
    out = [("job", j) for j in data["jobs"] if j["metadata"]["name"] == job_id]
    out += [
        ("pod", p) for p in data["pods"]
        if (p["metadata"].get("labels") or {}).get("ascend.dev/job-id") == job_id
    ]  # fmt: skip
    out += [
        ("event", e) for e in data["events"]
        if e.get("reason") == "FailedCreate" and e["involvedObject"]["name"] == job_id
    ]  # fmt: skip
    out.sort(key=lambda pair: int(pair[1]["metadata"]["resourceVersion"]))
    return job_id, out


def _when(obj: dict[str, Any]) -> float:
    stamp = obj["metadata"].get("creationTimestamp") or obj.get("firstTimestamp")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def replay(
    name: str,
    units: int = 1,
    grace: float = 0.0,
    stream_logs: bool | str = True,
    before: Any = None,
    startup_timeout: float = 900.0,
    **options: Any,
) -> tuple[Observer, _Tracker]:
    job_id, events = _events(name)
    job = _job(
        job_id,
        job_id.rsplit("-", 1)[0],
        items=units,
        resources=Resources.build(**options),
        stream_logs=stream_logs,
        startup_timeout=startup_timeout,
    )
    observer = Observer()
    # The recording's time: its first object was created "now", and time runs on.
    first = min(_when(obj) for _, obj in events)
    began = time.monotonic()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tracker = _Tracker(job, observer, Namespace(), grace, tg)  # type: ignore[arg-type]
            tracker.clock = lambda: first + time.monotonic() - began
            if before is not None:
                before(tracker)
            for kind, obj in events:
                if kind == "job":
                    tracker.uid = obj["metadata"]["uid"]
                    tracker.on_job("MODIFIED", obj)
                elif kind == "pod":
                    tracker.on_pod("MODIFIED", obj)
                else:
                    tracker.on_event("ADDED", obj)
                await anyio.lowlevel.checkpoint()
            await tracker.done.wait()
            tg.cancel_scope.cancel()
    return observer, tracker


FOLLOWED: list[str] = []


@pytest.fixture(autouse=True)
def no_log_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """Log streams are the subject of other tests: here they only note their pod."""
    FOLLOWED.clear()

    async def follow(api: Any, namespace: str, pod: str, *args: Any) -> None:
        FOLLOWED.append(pod)

    monkeypatch.setattr(_logs, "follow", follow)


async def test_a_returned_value_is_reported_finished_once() -> None:
    observer, _ = await replay("succeeded")
    assert (observer.done, observer.errors, observer.running) == ([0], {}, [0])


async def test_a_raised_exception_is_reported_finished_for_the_result_to_say_it() -> None:
    observer, _ = await replay("user_exception")
    assert (observer.done, observer.errors) == ([0], {})


@pytest.mark.parametrize(
    ("name", "options", "error", "text"),
    [
        ("exit_code", {}, ascend.WorkerFailed, "exit code 3"),
        ("oom_killed", {"memory": "150Mi"}, ascend.OOMKilled, "150Mi"),
        ("deadline", {"timeout": 2}, ascend.DeadlineExceeded, "timeout of 2 s"),
        ("run_timeout", {"timeout": 2}, ascend.DeadlineExceeded, "from the runner's start"),
        ("image_pull", {}, ascend.ImagePullError, "registry.invalid/none:1"),
        ("config_error", {}, ascend.WorkerFailed, "no-such-secret"),
        ("unschedulable", {"cpu": 64}, ascend.Unschedulable, "Insufficient cpu"),
        ("never_created", {}, ascend.WorkerFailed, "exceeded quota"),
        ("evicted_past_max", {"max_preemptions": 0}, ascend.Preempted, "max_preemptions=0"),
        (
            "preempted_by_scheduler",
            {"gpu": 2, "max_preemptions": 0},
            ascend.Preempted,
            "PreemptionByScheduler",
        ),
    ],
)
async def test_each_failure_is_reported_once_with_its_typed_error(
    name: str, options: dict[str, Any], error: type[Exception], text: str
) -> None:
    observer, tracker = await replay(name, **options)
    assert observer.done == []
    assert isinstance(observer.errors[0], error), observer.errors[0]
    assert text in str(observer.errors[0])
    assert tracker.errors == [observer.errors[0]]


async def test_a_disruption_within_max_preemptions_is_reported_as_a_preemption() -> None:
    observer, tracker = await replay("evicted_once", max_preemptions=1)
    assert observer.preemptions == [(0, 1)]
    assert len(tracker.disrupted[0]) == 1
    # Past max_preemptions the call is reported Preempted, not as a crash.
    assert isinstance(observer.errors[0], ascend.Preempted)


async def test_a_maps_items_are_settled_each_on_its_own() -> None:
    observer, _ = await replay("map_one_item_fails", units=3)
    assert sorted(observer.done) == [0, 2]
    assert list(observer.errors) == [1]
    assert observer.errors[1].exit_code == 3  # type: ignore[attr-defined]


async def test_an_items_output_asked_for_from_a_loop_callback_is_streamed() -> None:
    def ask(tracker: _Tracker) -> None:
        # As the scheduler does when someone reads an item's logs in another thread.
        loop = asyncio.get_running_loop()
        caller = threading.Thread(target=loop.call_soon_threadsafe, args=(tracker.follow_item, 1))
        caller.start()
        caller.join()

    await replay("map_one_item_fails", units=3, stream_logs="failed", before=ask)
    assert [p.rsplit("-", 2)[1] for p in FOLLOWED] == ["1"]


async def test_without_requests_a_quiet_maps_pods_are_not_streamed() -> None:
    await replay("map_one_item_fails", units=3, stream_logs="failed")
    assert FOLLOWED == []


async def test_each_disruption_of_a_pod_counts_once_until_max_preemptions_is_passed() -> None:
    """Three pods of one call evicted in turn (the recorded eviction, renamed)."""
    job_id, events = _events("evicted_once")
    pods = [o for k, o in events if k == "pod"]
    evicted = next(o for o in pods if "DisruptionTarget" in json.dumps(o))
    running = next(o for o in pods if o["status"].get("phase") == "Running")
    job = _job(job_id, "sleeper", resources=Resources.build(max_preemptions=2))
    observer = Observer()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tracker = _Tracker(job, observer, Namespace(), 0.0, tg)  # type: ignore[arg-type]
            for n in range(3):
                for version in (running, evicted, evicted):  # a disruption seen twice
                    pod = json.loads(json.dumps(version))
                    pod["metadata"]["name"] = f"{job_id}-{n}"
                    tracker.on_pod("MODIFIED", pod)
            await tracker.done.wait()
            tg.cancel_scope.cancel()
    assert observer.preemptions == [(0, 1), (0, 2)]
    error = observer.errors[0]
    assert isinstance(error, ascend.Preempted) and error.preemptions == 3
    assert "3 times (max_preemptions=2)" in str(error)
    assert observer.running == [0, 0, 0]  # each replacement reported its start


async def test_a_replacement_that_finds_no_node_is_unschedulable_after_the_grace() -> None:
    job_id, events = _events("evicted_once")
    pods = [o for k, o in events if k == "pod"]
    running = next(o for o in pods if o["status"].get("phase") == "Running")
    evicted = next(o for o in pods if "DisruptionTarget" in json.dumps(o))
    _, others = _events("unschedulable")
    stuck = json.loads(json.dumps(next(o for k, o in reversed(others) if k == "pod")))
    stuck["metadata"]["name"] = f"{job_id}-replacement"
    job = _job(job_id, "sleeper")
    observer = Observer()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tracker = _Tracker(job, observer, Namespace(), 0.0, tg)  # type: ignore[arg-type]
            tracker.clock = lambda: _when(stuck)  # just created: startup_timeout is far
            for pod in (running, evicted, stuck):
                tracker.on_pod("MODIFIED", pod)
            await tracker.done.wait()
            tg.cancel_scope.cancel()
    assert observer.preemptions == [(0, 1)]
    assert isinstance(observer.errors[0], ascend.Unschedulable)
    assert "Insufficient cpu" in str(observer.errors[0])


# -- startup_timeout ------------------------------------------------------------------


async def test_a_pod_that_does_not_start_within_startup_timeout_fails_the_call() -> None:
    # No node fits, and the grace for that is longer than startup_timeout: the earlier
    # bound decides.
    observer, tracker = await replay("unschedulable", grace=60, startup_timeout=0.5, cpu=64)
    error = observer.errors[0]
    assert isinstance(error, ascend.StartupTimeout), error
    assert "startup_timeout=0.5 s" in str(error) and "Insufficient cpu" in str(error)
    assert tracker.errors == [error]  # so the Job is deleted


async def test_an_unschedulable_grace_shorter_than_startup_timeout_decides_first() -> None:
    observer, _ = await replay("unschedulable", grace=0.2, startup_timeout=60, cpu=64)
    assert isinstance(observer.errors[0], ascend.Unschedulable)


async def test_a_pod_that_starts_within_startup_timeout_is_not_stopped() -> None:
    observer, tracker = await replay("succeeded", startup_timeout=30)
    assert (observer.done, observer.errors) == ([0], {})
    assert tracker._startup == {}  # the timer ended with the start


class _Api:
    """Records the requests a tracker makes (deleting a pod)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    async def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
        self.requests.append((method, path))
        return {}


class _DoneObserver(Observer):
    """Items are wanted until they have an outcome (as the scheduler's futures are)."""

    def wanted(self, items: range) -> bool:
        return any(i not in self.errors and i not in self.done for i in items)


async def test_a_map_items_pod_past_startup_timeout_fails_that_item_and_is_deleted() -> None:
    job_id, events = _events("map_one_item_fails")
    running = next(o for k, o in events if k == "pod" and o["status"].get("phase") == "Running")
    _, others = _events("unschedulable")
    stuck = json.loads(json.dumps(next(o for k, o in reversed(others) if k == "pod")))
    stuck["metadata"]["name"] = f"{job_id}-stuck"
    stuck["metadata"].setdefault("annotations", {})["batch.kubernetes.io/job-completion-index"] = (
        "1"
    )
    running = json.loads(json.dumps(running))
    running["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] = "0"
    job = _job(job_id, "point", items=2, startup_timeout=0.3)
    observer = _DoneObserver()
    namespace = Namespace()
    namespace.api = _Api()  # type: ignore[assignment]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tracker = _Tracker(job, observer, namespace, 60.0, tg)  # type: ignore[arg-type]
            tracker.clock = lambda: _when(stuck)
            tracker.on_pod("MODIFIED", running)
            tracker.on_pod("MODIFIED", stuck)
            await anyio.sleep(1.0)  # the timer's 0.3 s, then the pod's deletion
            tg.cancel_scope.cancel()
    assert isinstance(observer.errors[1], ascend.StartupTimeout)
    assert 0 not in observer.errors  # the other item goes on
    assert ("DELETE", f"/api/v1/namespaces/ascend-e2e/pods/{job_id}-stuck") in (
        namespace.api.requests  # type: ignore[attr-defined]
    )


async def test_a_pod_deleted_before_it_started_stops_its_startup_timer() -> None:
    _, events = _events("unschedulable")
    pod = next(o for k, o in reversed(events) if k == "pod")
    job_id = pod["metadata"]["labels"]["ascend.dev/job-id"]
    job = _job(job_id, "add", startup_timeout=0.2)
    observer = Observer()
    async with anyio.create_task_group() as tg:
        tracker = _Tracker(job, observer, Namespace(), 60.0, tg)  # type: ignore[arg-type]
        tracker.clock = lambda: _when(pod)
        tracker.on_pod("MODIFIED", pod)
        tracker.on_pod("DELETED", pod)
        await anyio.sleep(0.5)
        tg.cancel_scope.cancel()
    assert observer.errors == {}


async def test_a_recorded_pod_that_never_started_is_a_startup_timeout() -> None:
    observer, tracker = await replay("startup_timeout", grace=60, startup_timeout=1, cpu=64)
    error = observer.errors[0]
    assert isinstance(error, ascend.StartupTimeout), error
    assert "Insufficient cpu" in str(error) and tracker.errors == [error]
