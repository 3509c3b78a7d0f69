"""The permissions ascend needs in a user's namespace: one list for the docs, ``ascend
admin user add`` and ``ascend doctor``."""

from __future__ import annotations

from typing import Any, Final

# (apiGroup, resource, verbs). Keep docs/kubernetes.md's RBAC manifest identical.
RULES: Final[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
    ("batch", "jobs", ("get", "list", "watch", "create", "delete")),
    ("", "pods", ("get", "list", "watch")),
    ("", "pods/log", ("get", "list", "watch")),
    ("", "events", ("get", "list", "watch")),
    ("", "pods", ("delete",)),  # stops a cancelled map item's pod (the others go on)
    ("", "secrets", ("get", "create")),
    ("coordination.k8s.io", "leases", ("get", "list", "create", "patch", "delete")),
    ("", "configmaps", ("get",)),  # the cluster's defaults for environment builds
)


def role_rules() -> list[dict[str, Any]]:
    """The Role's ``rules``, grouped as docs/kubernetes.md shows them."""
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for group, resource, verbs in RULES:
        grouped.setdefault((group, verbs), []).append(resource)
    return [
        {"apiGroups": [group], "resources": resources, "verbs": list(verbs)}
        for (group, verbs), resources in grouped.items()
    ]


def checks() -> list[tuple[str, str, str | None, str]]:
    """One (group, resource, subresource, verb) per permission, for access reviews."""
    out: list[tuple[str, str, str | None, str]] = []
    for group, resource, verbs in RULES:
        base, _, sub = resource.partition("/")
        out.extend((group, base, sub or None, verb) for verb in verbs)
    return out
