"""What the local backend knows of a job's runner processes, for other processes to read.

The local backend has no cluster to ask whether a job still runs, so it writes one small
JSON record per work unit next to the job's detached output (the job's folder on a
``file://`` store, else ``$TMPDIR/ascend/<job id>``): the client and runner process ids
and how the unit ended. ``ascend jobs`` and ``ascend gc`` read them to tell a running job
from a finished, failed or cancelled one (the role the Job's status has on Kubernetes),
and ``ascend jobs cancel`` stops a detached job's runner by them.

A unit's states: ``pending`` (waiting for a worker), ``running`` (its runner process
is ``pid``), ``exited`` (its runner ended by itself; whether it published is in
storage), ``failed`` (it failed for good: ``error``), ``cancelled``. A ``pending`` or
``running`` record whose processes are all gone tells how its client ended: a detached
runner ended by itself, a non-detached one died with its client (cancelled).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import time
from typing import Any, Final

from ascend_runner._storage import local_path

_HOST: Final = socket.gethostname()
LIVE: Final = ("pending", "running")


def folder(root: str, job_id: str) -> str:
    """Where a job's records and detached output live on this machine."""
    return local_path(root) or os.path.join(tempfile.gettempdir(), "ascend", job_id)


def _path(root: str, job_id: str, unit: int) -> str:
    return os.path.join(folder(root, job_id), f"runner-{unit}.json")


def process_token(pid: int) -> str | None:
    """What tells this process from a later one given the same pid: its start time
    (Linux); ``"zombie"`` for a process that has ended but is not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "zombie" if fields[0] in ("Z", "X") else fields[19]


def alive(pid: int | None, token: str | None) -> bool:
    """Whether process ``pid`` (started with ``token``) still runs on this machine."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's
    now = process_token(pid)
    if now == "zombie":
        return False
    return token is None or now is None or now == token


def write(root: str, job_id: str, unit: int, **fields: Any) -> None:
    """Replace unit ``unit``'s record (blocking: call it from a worker thread)."""
    path = _path(root, job_id, unit)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    client = os.getpid()
    record = {
        "host": _HOST,
        "client_pid": client,
        "client_token": process_token(client),
        "updated": time.time(),
        **fields,
    }
    temporary = f"{path}.{client}.tmp"
    with open(temporary, "w") as f:
        json.dump(record, f)
    os.replace(temporary, path)


def read(root: str, job_id: str) -> dict[int, dict[str, Any]]:
    """Every unit's record of a job, by unit (blocking)."""
    records: dict[int, dict[str, Any]] = {}
    try:
        names = os.listdir(folder(root, job_id))
    except OSError:
        return records
    for name in names:
        stem = name.removeprefix("runner-").removesuffix(".json")
        if not (name.startswith("runner-") and name.endswith(".json") and stem.isdigit()):
            continue
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(folder(root, job_id), name)) as f:
                value = json.load(f)
            if isinstance(value, dict):
                records[int(stem)] = value
    return records


def runner_alive(record: dict[str, Any]) -> bool:
    return record.get("state") == "running" and alive(record.get("pid"), record.get("token"))


def client_alive(record: dict[str, Any]) -> bool:
    return alive(record.get("client_pid"), record.get("client_token"))


def unit_state(record: dict[str, Any]) -> str:
    """``live``, ``ended`` (it ran and ended by itself, or failed) or ``cancelled``."""
    state = record.get("state")
    if state in LIVE:
        if record.get("host") != _HOST:
            return "live"  # another machine's processes: nothing here can tell
        if runner_alive(record) or client_alive(record):
            return "live"
        # Nobody left to record how it ended: a detached runner ran to its end, a
        # non-detached one died with its client.
        return "ended" if record.get("detached") and state == "running" else "cancelled"
    return "cancelled" if state == "cancelled" else "ended"


def stop(root: str, job_id: str, grace: float = 2.0) -> list[int]:
    """Stop the live runners of a job on this machine (their whole process groups:
    SIGTERM, SIGKILL after ``grace``) and record their units as cancelled; the units
    stopped (blocking)."""
    stopped: list[int] = []
    for unit, record in read(root, job_id).items():
        if record.get("host") != _HOST or unit_state(record) != "live":
            continue
        write(root, job_id, unit, **{**_own(record), "state": "cancelled"})
        if runner_alive(record):
            pgid = int(record["pid"])
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while alive(pgid, record.get("token")) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        stopped.append(unit)
    return sorted(stopped)


def _own(record: dict[str, Any]) -> dict[str, Any]:
    """A record's fields other than those ``write`` sets itself."""
    return {
        k: v
        for k, v in record.items()
        if k not in ("host", "client_pid", "client_token", "updated")
    }


def cancelled_elsewhere(root: str, job_id: str, unit: int) -> bool:
    """Whether another process (``ascend jobs cancel``) recorded the unit as cancelled."""
    record = read(root, job_id).get(unit)
    return record is not None and record.get("state") == "cancelled"
