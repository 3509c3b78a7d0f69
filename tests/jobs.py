"""Jobs as backends receive them, for tests of what a backend makes of one."""

from __future__ import annotations

from typing import Any

from ascend import Resources
from ascend._config import Settings
from ascend._storage import JobPaths
from ascend.backends import Job, WorkUnit


def a_job(
    settings: Settings,
    *,
    job_id: str = "f-0123456789",
    name: str = "f",
    resources: Resources | None = None,
    items: int = 1,
    **fields: Any,
) -> Job:
    """A call (``items=1``) or a map of one item per index; ``fields`` set the rest of
    the :class:`~ascend.backends.Job` (``environment_spec``, ``environment``, ...)."""
    return Job(
        job_id=job_id,
        name=name,
        resources=resources or Resources.build(),
        settings=settings,
        paths=JobPaths.of(settings.user_prefix, job_id),
        is_map=items > 1,
        units=tuple(WorkUnit(i, range(i, i + 1)) for i in range(items)),
        signing_key=b"k" * 32,
        **fields,
    )
