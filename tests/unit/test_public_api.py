import inspect

import ascend

EXPECTED = {
    "ImagePullError",
    "ImageBuildError",
    "StartupTimeout",
    "OOMKilled",
    "PermissionDenied",
    "Preempted",
    "Unschedulable",
    "AscendError",
    "BlockingWaitError",
    "NoSuchJob",
    "ConfigError",
    "DeadlineExceeded",
    "Future",
    "IntegrityError",
    "LogStream",
    "MapFuture",
    "Progress",
    "RemoteError",
    "RemoteFunction",
    "Resources",
    "ResultMissing",
    "SerializationError",
    "Settings",
    "StorageError",
    "VersionMismatch",
    "WorkerFailed",
    "as_completed",
    "configure",
    "gather",
    "remote",
    "wait",
}


def test_public_surface_is_exactly_the_documented_names() -> None:
    assert set(ascend.__all__) == EXPECTED
    public = {n for n in dir(ascend) if not n.startswith("_")} - {"backends"}
    assert public == EXPECTED


def test_public_objects_are_documented_and_report_the_ascend_module() -> None:
    for name in ascend.__all__:
        obj = getattr(ascend, name)
        assert inspect.getdoc(obj), f"ascend.{name} has no docstring"
        assert obj.__module__ == "ascend", f"ascend.{name}.__module__ is {obj.__module__}"


def test_errors_form_one_hierarchy() -> None:
    for name in ascend.__all__:
        obj = getattr(ascend, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ascend.AscendError)
    assert issubclass(ascend.ConfigError, ValueError)
    assert issubclass(ascend.NoSuchJob, LookupError)
    assert issubclass(ascend.BlockingWaitError, RuntimeError)


def test_a_stopped_call_is_not_confusable_with_a_wait_that_ran_out() -> None:
    # ``except TimeoutError`` around ``fut.result(timeout=...)`` means "wait again"; a
    # call stopped at its deadline must not match it, or such a loop never ends.
    assert not issubclass(ascend.DeadlineExceeded, TimeoutError)
