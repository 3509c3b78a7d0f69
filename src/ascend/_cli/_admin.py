"""``ascend admin``: provision users, create storage, print the reaper's manifest."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import typer

from ascend import _config
from ascend._cli._common import (
    emit,
    emit_object,
    guard,
    require_kubernetes,
    run,
    state,
    with_output,
)
from ascend._errors import AscendError, ConfigError

app = typer.Typer(help="Cluster administration (needs admin credentials).", no_args_is_help=True)
user_app = typer.Typer(help="Provision and remove users.", no_args_is_help=True)
storage_app = typer.Typer(help="Object storage.", no_args_is_help=True)
app.add_typer(user_app, name="user")
app.add_typer(storage_app, name="storage")

MANAGED = {"app.kubernetes.io/managed-by": "ascend"}
ROLE = "ascend-user"
QUOTA = "ascend-quota"
LIMITS = "ascend-limits"


def names(user: str, template: str) -> dict[str, str]:
    """The objects ``admin user add`` manages for ``user``."""
    if not _config._NAME.match(user) or "." in user or "_" in user:
        raise ConfigError(
            f"user {user!r} is not a valid name. Fix: lowercase letters, digits and '-'."
        )
    account = f"ascend-user-{user}"
    return {
        "namespace": template.format(user=user),
        "service_account": account,
        "role": ROLE,
        "role_binding": account,
        "token_secret": f"{account}-token",
    }


def user_objects(
    user: str, n: dict[str, str], gpu_quota: int, pods: int, storage_secret: dict[str, Any] | None
) -> list[tuple[str, dict[str, Any]]]:
    """(collection path, object) for every object of a user, in creation order."""
    from ascend._rbac import role_rules

    ns = n["namespace"]
    labels = {**MANAGED, "ascend.dev/user": user}
    objects: list[tuple[str, dict[str, Any]]] = [
        (
            "/api/v1/namespaces",
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": ns,
                    "labels": {
                        **labels,
                        "pod-security.kubernetes.io/enforce": "restricted",
                        "pod-security.kubernetes.io/enforce-version": "latest",
                    },
                },
            },
        ),
        (
            f"/api/v1/namespaces/{ns}/serviceaccounts",
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": n["service_account"], "labels": labels},
            },
        ),
        (
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": n["role"], "labels": labels},
                "rules": role_rules(),
            },
        ),
        (
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": n["role_binding"], "labels": labels},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": n["role"],
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": n["service_account"], "namespace": ns}
                ],
            },
        ),
        (
            f"/api/v1/namespaces/{ns}/resourcequotas",
            {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": QUOTA, "labels": labels},
                "spec": {"hard": {"requests.nvidia.com/gpu": str(gpu_quota), "pods": str(pods)}},
            },
        ),
        (
            f"/api/v1/namespaces/{ns}/limitranges",
            {
                "apiVersion": "v1",
                "kind": "LimitRange",
                "metadata": {"name": LIMITS, "labels": labels},
                "spec": {
                    "limits": [
                        {"type": "Container", "defaultRequest": {"cpu": "100m", "memory": "256Mi"}}
                    ]
                },
            },
        ),
        (
            f"/api/v1/namespaces/{ns}/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "kubernetes.io/service-account-token",
                "metadata": {
                    "name": n["token_secret"],
                    "labels": labels,
                    "annotations": {"kubernetes.io/service-account.name": n["service_account"]},
                },
            },
        ),
    ]
    if storage_secret is not None:
        objects.append(
            (
                f"/api/v1/namespaces/{ns}/secrets",
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": storage_secret.get("type", "Opaque"),
                    "metadata": {"name": storage_secret["metadata"]["name"], "labels": labels},
                    "data": storage_secret.get("data") or {},
                },
            )
        )
    return objects


_COMPARED = ("rules", "roleRef", "subjects", "spec", "data")


def _differs(desired: dict[str, Any], actual: dict[str, Any]) -> bool:
    for key in _COMPARED:
        if key in desired and desired[key] != actual.get(key):
            return True
    for key in ("labels", "annotations"):
        want = desired["metadata"].get(key) or {}
        have = actual["metadata"].get(key) or {}
        if any(have.get(k) != v for k, v in want.items()):
            return True
    return False


async def ensure(api: Any, path: str, body: dict[str, Any]) -> str:
    """Create ``body`` under ``path``, or bring the existing object's managed fields to
    it; ``created``, ``updated`` or ``unchanged`` (then nothing was written)."""
    from ascend.backends._kubernetes._client import ApiError

    name = body["metadata"]["name"]
    try:
        actual = await api.request("GET", f"{path}/{name}")
    except ApiError as exc:
        if exc.status != 404:
            raise
        await api.request("POST", path, body=body)
        return "created"
    if not _differs(body, actual):
        return "unchanged"
    merged = {**actual, **{k: v for k, v in body.items() if k != "metadata"}}
    merged["metadata"] = {
        **actual["metadata"],
        "labels": {
            **(actual["metadata"].get("labels") or {}),
            **body["metadata"].get("labels", {}),
        },
        "annotations": {
            **(actual["metadata"].get("annotations") or {}),
            **body["metadata"].get("annotations", {}),
        },
    }
    await api.request("PUT", f"{path}/{name}", body=merged)
    return "updated"


async def _kubeconfig(
    api: Any, settings: _config.Settings, n: dict[str, str]
) -> tuple[dict[str, Any], bool]:
    """A kubeconfig for the user's ServiceAccount (its long-lived token Secret)."""
    ns = n["namespace"]
    token = ""
    ca = ""
    for _ in range(100):  # the token controller fills the Secret within a second or so
        secret = await api.request("GET", f"/api/v1/namespaces/{ns}/secrets/{n['token_secret']}")
        data = secret.get("data") or {}
        if data.get("token"):
            token = base64.b64decode(data["token"]).decode()
            ca = data.get("ca.crt", "")
            break
        await anyio.sleep(0.2)
    if not token:
        raise AscendError(
            f"the token Secret {ns}/{n['token_secret']} was not filled in. Fix: check that the "
            "controller-manager runs the service-account token controller."
        )
    configuration = api._client.configuration
    if not ca and configuration.ssl_ca_cert:
        ca = base64.b64encode(await anyio.Path(configuration.ssl_ca_cert).read_bytes()).decode()
    cluster: dict[str, Any] = {"server": configuration.host}
    if ca:
        cluster["certificate-authority-data"] = ca
    context = f"ascend-{n['service_account'].removeprefix('ascend-user-')}"
    return (
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "ascend", "cluster": cluster}],
            "users": [{"name": n["service_account"], "user": {"token": token}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": "ascend", "user": n["service_account"], "namespace": ns},
                }
            ],
            "current-context": context,
        },
        True,
    )


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from its first byte (it holds a token)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _current_namespace(settings: _config.Settings) -> str:
    return settings.namespace or "default"


async def add_user(
    settings: _config.Settings,
    user: str,
    template: str,
    gpu_quota: int,
    pods: int,
    storage_secret: str | None,
    kubeconfig_out: Path | None,
    from_namespace: str | None = None,
) -> dict[str, Any]:
    from ascend.backends._kubernetes._client import Api

    n = names(user, template)
    api = await Api.connect(settings)
    try:
        secret = None
        if storage_secret:
            source = from_namespace or _current_namespace(settings)
            secret = await api.request(
                "GET", f"/api/v1/namespaces/{source}/secrets/{storage_secret}"
            )
        actions = []
        for path, body in user_objects(user, n, gpu_quota, pods, secret):
            action = await ensure(api, path, body)
            actions.append(
                {"kind": body["kind"], "name": body["metadata"]["name"], "action": action}
            )
        written = None
        if kubeconfig_out is not None:
            config, _ = await _kubeconfig(api, settings, n)
            text = json.dumps(config, indent=2) + "\n"
            out_path = anyio.Path(kubeconfig_out)
            if not await out_path.exists() or await out_path.read_text() != text:
                await anyio.to_thread.run_sync(_write_private, kubeconfig_out, text)
            written = str(kubeconfig_out)
    finally:
        await api.close()
    return {"user": user, **n, "objects": actions, "kubeconfig": written}


@user_app.command("add")
@with_output
def user_add(
    ctx: typer.Context,
    name: str,
    gpu_quota: int = typer.Option(0, help="GPUs the user's pods may request at once"),
    pods: int = typer.Option(200, help="pods the user may have at once"),
    namespace_template: str = typer.Option("ascend-users-{user}", help="the user's namespace"),
    storage_secret: str | None = typer.Option(
        None, help="Secret to copy in (the storage credentials)"
    ),
    from_namespace: str | None = typer.Option(
        None, help="where --storage-secret is (default: the global --namespace, or default)"
    ),
    kubeconfig_out: Path | None = typer.Option(None, help="write the user's kubeconfig here"),
) -> None:
    """Namespace (restricted Pod Security), ServiceAccount, Role + RoleBinding, quota,
    limits, storage Secret and a kubeconfig for one user. Idempotent."""
    st = state(ctx)
    try:
        settings = st.settings()
        require_kubernetes(settings, "ascend admin user add")
        out = run(
            add_user(
                settings,
                name,
                namespace_template,
                gpu_quota,
                pods,
                storage_secret,
                kubeconfig_out,
                from_namespace,
            )
        )
    except AscendError as exc:
        raise guard(exc) from None
    if st.json:
        emit_object(st, out)
    else:
        emit(st, out["objects"], ("kind", "name", "action"), f"user {name} in {out['namespace']}")
        if out["kubeconfig"]:
            typer.echo(f"kubeconfig written to {out['kubeconfig']}")


async def remove_user(
    settings: _config.Settings, user: str, template: str, keep_data: bool
) -> dict[str, Any]:
    from ascend._scheduler import get_scheduler
    from ascend.backends._kubernetes._client import Api, ApiError

    n = names(user, template)
    api = await Api.connect(settings)
    try:
        await api.request("DELETE", f"/api/v1/namespaces/{n['namespace']}")
        deleted = True
    except ApiError as exc:
        if exc.status != 404:
            raise
        deleted = False
    finally:
        await api.close()
    data = None
    if not keep_data:
        data = f"{settings.storage.rstrip('/')}/projects/{settings.project}/users/{user}"
        await get_scheduler().storage(settings).delete(data, recursive=True)
    return {"user": user, "namespace": n["namespace"], "deleted": deleted, "data_deleted": data}


@user_app.command("remove")
@with_output
def user_remove(
    ctx: typer.Context,
    name: str,
    namespace_template: str = typer.Option("ascend-users-{user}", help="the user's namespace"),
    keep_data: bool = typer.Option(False, "--keep-data", help="keep the user's storage folder"),
) -> None:
    """Delete a user's namespace (and everything in it) and, unless --keep-data, their
    storage folder in the configured project."""
    st = state(ctx)
    try:
        settings = st.settings()
        require_kubernetes(settings, "ascend admin user remove")
        out = run(remove_user(settings, name, namespace_template, keep_data))
    except AscendError as exc:
        raise guard(exc) from None
    emit_object(st, out)


async def create_bucket(url: str, options: dict[str, Any]) -> str:
    from ascend._storage import Storage

    storage = Storage(url, options)
    fs = await storage._filesystem()
    path = storage._path(fs, url)
    if await fs._exists(path):
        return "exists"
    await fs._mkdir(path, create_parents=True)
    return "created"


@storage_app.command("create")
@with_output
def storage_create(ctx: typer.Context, url: str) -> None:
    """Create the bucket or container (or folder) of URL through fsspec; idempotent."""
    st = state(ctx)
    try:
        settings = st.settings()
        action = run(create_bucket(url, dict(settings.storage_options)))
    except AscendError as exc:
        raise guard(exc) from None
    except Exception as exc:
        raise guard(AscendError(f"cannot create {url}: {exc!r}")) from None
    emit_object(st, {"url": url, "action": action})


REAPER_RULES = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "list", "delete"],
    }
]


def reaper_manifest(namespace: str, image: str, schedule: str) -> list[dict[str, Any]]:
    """A CronJob that deletes the namespace's expired session Leases (and so their Jobs)."""
    name = "ascend-reaper"
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace, "labels": MANAGED},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name, "namespace": namespace, "labels": MANAGED},
            "rules": REAPER_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace, "labels": MANAGED},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": name, "namespace": namespace, "labels": MANAGED},
            "spec": {
                "schedule": schedule,
                "concurrencyPolicy": "Forbid",
                "successfulJobsHistoryLimit": 1,
                "failedJobsHistoryLimit": 1,
                "jobTemplate": {
                    "spec": {
                        "ttlSecondsAfterFinished": 600,
                        "backoffLimit": 0,
                        "template": {
                            "metadata": {"labels": MANAGED},
                            "spec": {
                                "serviceAccountName": name,
                                "restartPolicy": "Never",
                                "securityContext": {
                                    "runAsNonRoot": True,
                                    "runAsUser": 10001,
                                    "seccompProfile": {"type": "RuntimeDefault"},
                                },
                                "containers": [
                                    {
                                        "name": "reaper",
                                        "image": image,
                                        "command": ["python", "-m", "ascend._cli._reaper"],
                                        "env": [
                                            {
                                                "name": "ASCEND_NAMESPACE",
                                                "valueFrom": {
                                                    "fieldRef": {"fieldPath": "metadata.namespace"}
                                                },
                                            }
                                        ],
                                        "securityContext": {
                                            "allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]},
                                        },
                                    }
                                ],
                            },
                        },
                    }
                },
            },
        },
    ]


@app.command()
@with_output
def reaper(
    ctx: typer.Context,
    manifest: bool = typer.Option(False, "--manifest", help="print the CronJob's manifest"),
    image: str = typer.Option(
        "ghcr.io/ascend-k8s/ascend-k8s:0.1.0",
        help="an image with ascend-k8s[kubernetes] installed",
    ),
    schedule: str = typer.Option("* * * * *", help="cron schedule (the reaper period)"),
) -> None:
    """Print the manifest of a server-side reaper of expired sessions (a CronJob per
    namespace), or run one reaping pass here."""
    st = state(ctx)
    try:
        settings = st.settings()
        require_kubernetes(settings, "ascend admin reaper")
        namespace = settings.namespace or "default"
        if manifest:
            items = reaper_manifest(namespace, image, schedule)
            sys.stdout.write(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
            sys.stdout.write("\n")
            return
        from ascend._cli._reaper import reap_once

        reaped = run(reap_once(settings))
    except AscendError as exc:
        raise guard(exc) from None
    emit(st, [{"lease": name} for name in reaped], ("lease",), "expired sessions deleted")
