"""One exit-code diagnosis and one deadline message for every backend."""

from __future__ import annotations

import signal

import pytest

import ascend
from ascend.backends import _diagnosis
from ascend_runner import protocol

WHERE = "f (job f-0123456789)"


@pytest.mark.parametrize("code", [protocol.ExitCode.OK, protocol.ExitCode.USER_EXCEPTION])
def test_an_exit_after_publishing_is_no_error(code: int) -> None:
    assert _diagnosis.exit_error(WHERE, code) is None


def test_a_process_killed_by_a_signal_names_it_with_the_shell_exit_code() -> None:
    error = _diagnosis.exit_error(WHERE, -signal.SIGKILL, logs="last line")
    assert isinstance(error, ascend.WorkerFailed)
    assert error.exit_code == 137 and "SIGKILL" in str(error) and "last line" in str(error)


def test_a_container_killed_by_a_signal_says_which() -> None:
    error = _diagnosis.exit_error(WHERE, 137, reason="Error")
    assert isinstance(error, ascend.WorkerFailed) and "signal SIGKILL" in str(error)


def test_an_oom_kill_is_oom_killed_naming_the_limit() -> None:
    error = _diagnosis.exit_error(WHERE, 137, oom=True, memory="1Gi")
    assert isinstance(error, ascend.OOMKilled) and "1Gi" in str(error)


def test_a_version_mismatch_is_its_own_error_with_the_runners_words() -> None:
    tail = ["x", f"{protocol.DIAGNOSTIC_PREFIX}made by Python 3.12"]
    error = _diagnosis.exit_error(
        WHERE, protocol.ExitCode.VERSION_MISMATCH, message=_diagnosis.runner_reason(tail)
    )
    assert isinstance(error, ascend.VersionMismatch)
    assert str(error).endswith("made by Python 3.12")
    assert not _diagnosis.retryable(error)


@pytest.mark.parametrize(
    "code",
    [
        protocol.ExitCode.PACKAGE_UNREADABLE,
        protocol.ExitCode.RESULT_UNWRITABLE,
        protocol.ExitCode.BAD_INVOCATION,
    ],
)
def test_a_reserved_exit_code_is_named_and_not_retried(code: int) -> None:
    error = _diagnosis.exit_error(WHERE, code, message="why")
    assert isinstance(error, ascend.WorkerFailed) and error.exit_code == code
    assert protocol.ExitCode(code).name.lower().replace("_", " ") in str(error)
    assert not _diagnosis.retryable(error)


def test_any_other_exit_code_is_retryable_worker_failed() -> None:
    error = _diagnosis.exit_error(WHERE, 3, logs="boom")
    assert isinstance(error, ascend.WorkerFailed) and error.exit_code == 3
    assert "exit code 3" in str(error) and "boom" in str(error)
    assert _diagnosis.retryable(error)


def test_the_deadline_message_names_the_timeout_and_the_fix() -> None:
    error = _diagnosis.deadline_error(WHERE, 2.5)
    assert isinstance(error, ascend.DeadlineExceeded) and not isinstance(error, TimeoutError)
    assert str(error).startswith(f"{WHERE} ran past its timeout of 2.5 s per call")
    assert "Fix: raise timeout=" in str(error)


@pytest.mark.parametrize("code", [3, -signal.SIGKILL, protocol.ExitCode.TERMINATED])
def test_a_crash_that_printed_nothing_says_so_instead_of_an_empty_last_output(code: int) -> None:
    error = _diagnosis.exit_error(WHERE, code)
    assert error is not None
    assert "Last output" not in str(error)
    assert str(error).endswith("It printed nothing.")
    with_output = _diagnosis.exit_error(WHERE, code, logs="boom")
    assert str(with_output).endswith("Last output:\nboom")
