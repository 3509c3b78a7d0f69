"""What the Kubernetes benchmarks count: the API server's metrics, the client's requests."""

from __future__ import annotations

from ascend import _scheduler


def metric(text: str, name: str, *labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include every one of ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def client_api_requests() -> int:
    """Every request this process's Kubernetes clients have sent (their own count)."""
    total = 0
    for backend in _scheduler.get_scheduler()._backends.values():
        for ns in getattr(backend, "_namespaces", {}).values():
            total += ns.api.requests
    return total
