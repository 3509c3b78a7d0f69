"""Pure pieces of the command line and the session reaper."""

from __future__ import annotations

import datetime as dt

import pytest
import typer

from ascend._cli._admin import _differs, names
from ascend._cli._common import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("7d", 604800),
        ("1w", 604800),
        ("1.5h", 5400),
    ],
)
def test_durations_are_read_in_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "7y", "-1d", "h"])
def test_a_bad_duration_is_a_usage_error(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="not a duration"):
        parse_duration(text)


def test_user_names_follow_the_original_naming() -> None:
    assert names("alice", "ascend-users-{user}") == {
        "namespace": "ascend-users-alice",
        "service_account": "ascend-user-alice",
        "role": "ascend-user",
        "role_binding": "ascend-user-alice",
        "token_secret": "ascend-user-alice-token",
    }


@pytest.mark.parametrize("bad", ["Alice", "a_b", "a.b", "-a", ""])
def test_a_user_name_that_cannot_name_kubernetes_objects_is_refused(bad: str) -> None:
    import ascend

    with pytest.raises(ascend.ConfigError, match="not a valid name"):
        names(bad, "ascend-users-{user}")


def test_an_object_differs_only_in_the_fields_ascend_manages() -> None:
    desired = {"metadata": {"name": "r", "labels": {"a": "1"}}, "rules": [1]}
    actual = {
        "metadata": {"name": "r", "labels": {"a": "1", "extra": "kept"}, "resourceVersion": "9"},
        "rules": [1],
    }
    assert not _differs(desired, actual)
    assert _differs({**desired, "rules": [2]}, actual)
    assert _differs({"metadata": {"name": "r", "labels": {"a": "2"}}}, actual)


@pytest.mark.k8s  # needs the Kubernetes client installed (the e2e session), not a cluster
def test_a_lease_expires_after_its_renew_time_plus_its_duration() -> None:
    from ascend.backends._kubernetes._session import expired, micro_time

    renewed = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    lease = {"spec": {"renewTime": micro_time(renewed), "leaseDurationSeconds": 60}}
    assert not expired(lease, renewed + dt.timedelta(seconds=59))
    assert expired(lease, renewed + dt.timedelta(seconds=61))
    assert expired({"metadata": {}, "spec": {}}), "a lease with no time at all is expired"
