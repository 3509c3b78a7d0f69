"""``ascend doctor``: one line per check, each failure with what to fix."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import typer

from ascend import _config
from ascend._cli._common import emit, run, state, with_output
from ascend._errors import AscendError


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped
    detail: str
    fix: str = ""


async def check_cluster(settings: _config.Settings, signing_secret: str) -> list[Check]:
    """Reachability, then one SelfSubjectAccessReview per permission ascend needs, then
    the Secrets calls use."""
    from ascend._rbac import checks
    from ascend.backends._kubernetes._client import Api

    namespace = settings.namespace or "default"
    try:
        api = await Api.connect(settings)
    except AscendError as exc:
        return [Check("kubeconfig", False, str(exc), "set --kubeconfig or KUBECONFIG")]
    out: list[Check] = []
    try:
        try:
            version = await api.request("GET", "/version")
        except Exception as exc:
            return [
                Check(
                    "cluster reachable",
                    False,
                    f"{exc}",
                    "check the kubeconfig's server address, context and credentials",
                )
            ]
        out.append(Check("cluster reachable", True, f"Kubernetes {version.get('gitVersion')}"))
        missing: list[str] = []
        for group, resource, sub, verb in checks():
            attributes: dict[str, Any] = {
                "namespace": namespace,
                "verb": verb,
                "group": group,
                "resource": resource,
            }
            if sub:
                attributes["subresource"] = sub
            review = await api.request(
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                body={
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SelfSubjectAccessReview",
                    "spec": {"resourceAttributes": attributes},
                },
            )
            if not review.get("status", {}).get("allowed"):
                full = f"{resource}/{sub}" if sub else resource
                missing.append(f"{verb} {full}{'.' + group if group else ''}")
        if missing:
            out.append(
                Check(
                    "permissions",
                    False,
                    f"missing in namespace {namespace}: {', '.join(missing)}",
                    "ask an admin to add them to your Role (docs/kubernetes.md, RBAC), or "
                    "`ascend admin user add`",
                )
            )
        else:
            out.append(Check("permissions", True, f"every permission ascend needs in {namespace}"))
        from ascend._errors import PermissionDenied
        from ascend.backends._kubernetes._client import ApiError

        path = f"/api/v1/namespaces/{namespace}/secrets/{signing_secret}"
        try:
            await api.request("GET", path)
            out.append(Check("signing key", True, f"Secret {signing_secret} holds this key"))
        except ApiError as exc:
            if exc.status != 404:
                raise
            out.append(
                Check("signing key", True, f"Secret {signing_secret} is created by the first call")
            )
        except PermissionDenied as exc:
            out.append(
                Check("signing key", False, f"Secret {signing_secret}: {exc}", "grant get secrets")
            )
        if settings.storage_secret:
            path = f"/api/v1/namespaces/{namespace}/secrets/{settings.storage_secret}"
            try:
                await api.request("GET", path)
                out.append(Check("storage secret", True, f"{settings.storage_secret} exists"))
            except (ApiError, PermissionDenied) as exc:
                out.append(
                    Check(
                        "storage secret",
                        False,
                        f"Secret {settings.storage_secret}: {exc}",
                        "create it in the namespace (ascend admin user add --storage-secret)",
                    )
                )
        if settings.registry_secret:
            path = f"/api/v1/namespaces/{namespace}/secrets/{settings.registry_secret}"
            try:
                found = await api.request("GET", path)
                kind = found.get("type")
                ok = kind == "kubernetes.io/dockerconfigjson"
                out.append(
                    Check(
                        "registry secret",
                        ok,
                        f"{settings.registry_secret} exists ({kind})",
                        "" if ok else "recreate it with `kubectl create secret docker-registry`",
                    )
                )
            except (ApiError, PermissionDenied) as exc:
                out.append(
                    Check(
                        "registry secret",
                        False,
                        f"Secret {settings.registry_secret}: {exc}",
                        "create it: kubectl create secret docker-registry "
                        f"{settings.registry_secret} --docker-server=... --docker-username=... "
                        "--docker-password=...",
                    )
                )
    finally:
        await api.close()
    return out


async def check_registry(settings: _config.Settings) -> Check:
    """This machine reaches ``registry`` and may read it (environment images are looked
    up by tag from here)."""
    from ascend import _registry

    assert settings.registry is not None
    try:
        target = _registry.parse_target(settings.registry)
        session = await anyio.to_thread.run_sync(_registry._session, target)
        await anyio.to_thread.run_sync(
            _registry.lookup, session, target.repository, "ascend-doctor-probe"
        )
    except AscendError as exc:
        detail, _, fix = str(exc).partition(". Fix: ")
        return Check("registry", False, detail, fix.rstrip(".") or "check the registry setting")
    return Check(
        "registry",
        True,
        f"{settings.registry}: reachable, reads allowed (push rights are not checked)",
    )


async def check_storage(settings: _config.Settings) -> list[Check]:
    """Write, read, create-only write and delete a probe object under the user's prefix."""
    from ascend._scheduler import get_scheduler

    storage = get_scheduler().storage(settings)
    probe = f"{settings.user_prefix}/.doctor/{secrets.token_hex(6)}"
    data = memoryview(secrets.token_bytes(32))
    steps = []
    try:
        await storage.write(probe, [data])
        steps.append("write")
        if bytes(await storage.read(probe)) != bytes(data):
            return [Check("storage", False, f"{probe} read back differs", "check the store")]
        steps.append("read")
        if await storage.put_blob(probe, data, hashlib.sha256(data).hexdigest()):
            return [
                Check(
                    "storage",
                    False,
                    f"{probe}: a create-only write replaced an existing object",
                    "use a store with existence checks",
                )
            ]
        steps.append("create-only")
        await storage.delete(probe)
        if await storage.exists(probe):
            return [Check("storage", False, f"{probe} survived a delete", "grant delete")]
        steps.append("delete")
    except Exception as exc:
        done = ", ".join(steps) or "nothing"
        return [
            Check(
                "storage",
                False,
                f"{settings.storage}: {exc} (worked: {done})",
                "check the URL, storage_options and credentials",
            )
        ]
    return [Check("storage", True, f"{settings.storage}: write, read, create-only, delete")]


async def check_nodes(settings: _config.Settings, gpu: int, node_type: str | None) -> Check:
    from ascend._errors import PermissionDenied
    from ascend.backends._kubernetes._client import Api

    api = await Api.connect(settings)
    try:
        nodes = await api.request("GET", "/api/v1/nodes")
    except PermissionDenied:
        return Check("nodes", None, "cannot list nodes with these credentials: skipped")
    finally:
        await api.close()
    fits = []
    for node in nodes.get("items") or []:
        labels = node["metadata"].get("labels", {})
        if node_type and labels.get("node.kubernetes.io/instance-type") != node_type:
            continue
        if int(node.get("status", {}).get("allocatable", {}).get("nvidia.com/gpu", 0)) < gpu:
            continue
        fits.append(node["metadata"]["name"])
    if fits:
        return Check("nodes", True, f"{len(fits)} node(s) could fit: {', '.join(fits[:5])}")
    return Check(
        "nodes",
        False,
        f"no node has {gpu} GPU(s)" + (f" of type {node_type}" if node_type else ""),
        "ask for less, another node type, or a cluster autoscaler node group",
    )


def _remove_job_folder(settings: _config.Settings, job_id: str) -> None:
    """The probe call succeeded: its job folder is of no use to anyone (a failed one's is
    kept, for ``ascend jobs logs``)."""
    from ascend._scheduler import get_scheduler
    from ascend._storage import JobPaths

    storage = get_scheduler().storage(settings)
    run(storage.delete(JobPaths.of(settings.user_prefix, job_id).root, recursive=True))


def _version_job(settings: _config.Settings, timeout: float) -> Check:
    """Run one tiny call: the runner refuses a package from another Python/cloudpickle."""
    import ascend

    @ascend.remote(timeout=timeout)
    def ascend_doctor_probe() -> str:
        import sys

        return sys.version.split()[0]

    try:
        remote = ascend_doctor_probe()
        version = remote.result(timeout + 120)
        _remove_job_folder(settings, remote.job_id)
    except Exception as exc:
        fix = (
            "use a runner image with this client's Python and cloudpickle (--image)"
            if settings.image
            else "the runner-only environment must build in the cluster: the build Job "
            "must reach a package index (index_url, or the ascend-defaults ConfigMap), "
            "or set --image to a runner image"
        )
        return Check("runner job", False, f"{type(exc).__name__}: {exc}", fix)
    return Check("runner job", True, f"ran a tiny call; runner Python {version}")


@with_output
def doctor(
    ctx: typer.Context,
    job: bool = typer.Option(True, "--job/--no-job", help="run one tiny call as a last check"),
    gpu: int = typer.Option(0, help="check that some node could fit this many GPUs"),
    node_type: str | None = typer.Option(None, help="check that some node has this type"),
    timeout: float = typer.Option(60, help="seconds the tiny call may run"),
) -> None:
    """Check the settings, cluster access, permissions, storage and runner; exit 1 on any
    failure."""
    st = state(ctx)
    try:
        settings = st.settings()
    except AscendError as exc:
        checks = [
            Check(
                "settings",
                False,
                str(exc),
                "fix the setting the detail names (its flag, ASCEND_* variable, [tool.ascend] "
                "key or config file entry)",
            )
        ]
    else:
        checks = [
            Check("settings", True, f"backend {settings.backend}, storage {settings.storage}")
        ]
        if settings.backend == "kubernetes":
            from ascend._serialization import signing_key
            from ascend.backends._kubernetes._spec import signing_secret_name

            secret = signing_secret_name(settings.user, signing_key())
            checks += run(check_cluster(settings, secret))
        checks += run(check_storage(settings))
        if settings.backend == "kubernetes" and settings.registry:
            checks.append(run(check_registry(settings)))
        if settings.backend == "kubernetes" and (gpu or node_type):
            checks.append(run(check_nodes(settings, gpu, node_type)))
        if job and all(c.ok is not False for c in checks):
            checks.append(_version_job(settings, timeout))
    rows = [asdict(c) for c in checks]
    emit(st, rows, ("name", "ok", "detail", "fix"), "ascend doctor")
    if any(c.ok is False for c in checks):
        raise typer.Exit(1)
