"""The Kubernetes pod spec carries the configured termination grace period.

Marked ``k8s``: it imports the Kubernetes backend (its extra is in the e2e session).
"""

from __future__ import annotations

import pytest

import ascend

pytestmark = pytest.mark.k8s


def test_pods_get_the_configured_short_termination_grace_period() -> None:
    from ascend._resources import Resources
    from ascend.backends._kubernetes._spec import job_manifest
    from tests.jobs import a_job

    settings = ascend.configure(termination_grace=2.5)
    job = a_job(settings, resources=Resources())
    pod = job_manifest(job, session="s", image="runner:test")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 3
