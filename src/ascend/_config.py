"""Settings and where they come from.

Precedence, highest first: :func:`configure` arguments, ``ASCEND_*`` environment
variables, ``[tool.ascend]`` in the nearest ``pyproject.toml``, the user config file
(``$XDG_CONFIG_HOME/ascend/config.toml``, default ``~/.config/ascend/config.toml``),
then the defaults below.
"""

from __future__ import annotations

import dataclasses
import difflib
import getpass
import json
import os
import re
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ascend._errors import ConfigError

BACKENDS = ("local", "kubernetes")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")  # a Secret's name


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def _config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def user_config_path() -> Path:
    """The user config file (TOML, same keys as ``[tool.ascend]``)."""
    return _config_home() / "ascend" / "config.toml"


def _default_user() -> str:
    try:
        raw = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. a container with a random uid
        raw = "user"
    return re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-._") or "user"


@dataclass(frozen=True)
class Settings:
    """The resolved settings every call uses. Build with :func:`configure`.

    Attributes:
        backend: ``"local"`` (subprocesses on this machine) or ``"kubernetes"``.
        storage: fsspec URL of the folder holding packages and results.
        storage_options: options for the fsspec filesystem (no credentials: pass those
            through the cloud SDKs' environment variables or a Kubernetes Secret).
        project, user: the storage layout is ``{storage}/projects/{project}/users/{user}``.
        namespace, kubeconfig, context, image, storage_secret: Kubernetes backend settings.
        max_workers: processes the local backend runs at once (default: CPU count).
        stream_logs: print each call's output, prefixed, as it arrives (``True``), not at
            all (``False``), or only for calls and map items that fail (``"failed"``:
            their output is printed when they fail). ``fut.logs()`` has it all anyway.
        detach: leave calls running when the interpreter exits instead of cancelling them.
        progress: show a progress bar for ``map`` (``None``: only when interactive).
        unschedulable_grace: seconds a Kubernetes pod may stay unschedulable (an
            autoscaler may be adding a node) before the call fails as ``Unschedulable``.
        kubernetes_writes_per_second: the client-side rate limit of API writes (Job
            creates and deletes), with bursts of twice that.
        termination_grace: seconds Kubernetes leaves a runner between ``SIGTERM`` and
            ``SIGKILL`` (its pods' ``terminationGracePeriodSeconds``, rounded up). The
            runner stops at once on ``SIGTERM``; this only bounds code that ignores it.
        blob_threshold: buffers and arguments of at least this many bytes are stored
            once under their SHA-256 digest and shared by every call that passes them.
        session_lease_seconds: Kubernetes: how long this client's session Lease lives
            without renewal; its Jobs (unless detached) are deleted once it expires.
        session_reaper_seconds: Kubernetes: how often a client deletes expired session
            Leases in its namespace. An orphaned Job is gone within the sum of the two.
        node_types: named placements for ``node_type=NAME`` (Kubernetes), each a table
            with any of ``gpu`` (a count or model, as ``gpu=``), ``product`` (a GPU model
            or a list of them), ``gpu_memory``, ``selector`` (node labels to match) and
            ``tolerations`` (Kubernetes tolerations). A ``node_type`` that names none of
            them selects nodes by ``node.kubernetes.io/instance-type``.
        preflight: before creating a Job that asks for GPUs or a node type, check that
            some node of the cluster could run it and fail at once if none could
            (needs permission to list nodes; skipped, with a warning, without it). Turn
            off when nodes come from an autoscaler that starts from zero.
        base_image: the image environments start from (default ``python:X.Y-slim`` for
            this client's Python); ``name@sha256:...`` pins its digest into the key.
        index_url: the package index builds resolve from (default: uv's, PyPI);
            ``"none"`` uses only ``find_links``.
        extra_index_url, find_links: more indexes / wheel folders or pages, separated by
            spaces or commas.
        build: where environments are built for Kubernetes: ``"cluster"`` (a build Job)
            or ``"local"`` (on this machine, with uv). The local backend always builds here.
        startup_timeout: seconds everything before the function's first line may take
            (environment build and fetch, scheduling, image pull); ``timeout`` is apart.
        registry: ``host[:port]/repository`` (``http://`` prefix without TLS): Kubernetes
            environments become OCI images pushed there instead of archives in storage.
        registry_secret: the name of a ``kubernetes.io/dockerconfigjson`` Secret in the
            namespace with credentials for ``registry``: build Jobs push with it, pods
            pull with it (``imagePullSecrets``). Default: none (a registry that needs
            no credentials from the cluster).
    """

    backend: str = "local"
    storage: str = field(default_factory=lambda: (_cache_home() / "ascend").as_uri())
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    project: str = "default"
    user: str = field(default_factory=_default_user)
    namespace: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    image: str | None = None
    storage_secret: str | None = None
    max_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    stream_logs: bool | str = True
    detach: bool = False
    progress: bool | None = None
    unschedulable_grace: float = 30.0
    kubernetes_writes_per_second: float = 20.0
    blob_threshold: int = 1 << 20
    session_lease_seconds: float = 60.0
    session_reaper_seconds: float = 30.0
    node_types: Mapping[str, NodeType] = field(default_factory=dict)
    preflight: bool = True
    base_image: str | None = None
    index_url: str | None = None
    extra_index_url: str | None = None
    find_links: str | None = None
    build: str = "cluster"
    startup_timeout: float = 900.0
    registry: str | None = None
    registry_secret: str | None = None
    termination_grace: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.node_types, Mapping):
            raise ConfigError(
                "node_types must be a table of named node types, e.g. "
                "[tool.ascend.node_types.gpu_small] with gpu = 1 and product = 'L4'."
            )
        object.__setattr__(
            self,
            "node_types",
            {name: NodeType.build(name, value) for name, value in self.node_types.items()},
        )
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"backend {self.backend!r} is unknown. Fix: use one of {', '.join(BACKENDS)}."
            )
        for name in ("project", "user"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _NAME.match(value):
                raise ConfigError(
                    f"{name} {value!r} is not a valid name. Fix: use lowercase letters, digits, "
                    "'.', '_' or '-' (at most 63 characters, starting and ending alphanumeric)."
                )
        if not isinstance(self.storage, str) or not self.storage:
            raise ConfigError("storage must be an fsspec URL such as 's3://bucket/ascend'.")
        if not isinstance(self.storage_options, Mapping):
            raise ConfigError("storage_options must be a mapping of fsspec options.")
        if not isinstance(self.unschedulable_grace, int | float) or self.unschedulable_grace < 0:
            raise ConfigError(
                "unschedulable_grace must be a number of seconds, "
                f"not {self.unschedulable_grace!r}."
            )
        grace = self.termination_grace
        if not isinstance(grace, int | float) or isinstance(grace, bool) or not grace >= 0:
            raise ConfigError(
                f"termination_grace must be a number of seconds (0 or more), not {grace!r}."
            )
        rate = self.kubernetes_writes_per_second
        if not isinstance(rate, int | float) or isinstance(rate, bool) or rate <= 0:
            raise ConfigError(f"kubernetes_writes_per_second must be positive, not {rate!r}.")
        if not isinstance(self.max_workers, int) or self.max_workers < 1:
            raise ConfigError(f"max_workers must be a positive integer, not {self.max_workers!r}.")
        threshold = self.blob_threshold
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
            raise ConfigError(
                f"blob_threshold must be a positive number of bytes, not {threshold!r}."
            )
        for name in ("session_lease_seconds", "session_reaper_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}.")
        if self.build not in ("cluster", "local"):
            raise ConfigError(f"build must be 'cluster' or 'local', not {self.build!r}.")
        startup = self.startup_timeout
        if not isinstance(startup, int | float) or isinstance(startup, bool) or startup <= 0:
            raise ConfigError(f"startup_timeout must be positive seconds, not {startup!r}.")
        secret = self.registry_secret
        if secret is not None and (not isinstance(secret, str) or not _DNS_NAME.match(secret)):
            raise ConfigError(
                f"registry_secret {secret!r} is not a Secret name. Fix: name the "
                "kubernetes.io/dockerconfigjson Secret (lowercase letters, digits, '-' and "
                "'.'), e.g. created by `kubectl create secret docker-registry NAME ...`."
            )
        if self.stream_logs not in (True, False, "failed"):
            raise ConfigError(
                f"stream_logs must be True, False or 'failed', not {self.stream_logs!r}."
            )

    @property
    def user_prefix(self) -> str:
        """``{storage}/projects/{project}/users/{user}``."""
        return f"{self.storage.rstrip('/')}/projects/{self.project}/users/{self.user}"

    @property
    def blobs(self) -> str:
        """The folder of this user's content-addressed blobs (``sha256/{digest}``)."""
        return f"{self.user_prefix}/blobs"


_NODE_TYPE_KEYS = ("gpu", "product", "gpu_memory", "selector", "tolerations")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


@dataclass(frozen=True)
class NodeType:
    """A named placement from ``[tool.ascend.node_types.NAME]`` (see :class:`Settings`)."""

    name: str
    gpu: int | str | tuple[str, ...] = 0
    gpu_memory: str | None = None
    selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def build(cls, name: str, value: Any) -> NodeType:
        if isinstance(value, NodeType):
            return value
        where = f"node_types.{name}"
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table with any of {', '.join(_NODE_TYPE_KEYS)}.")
        unknown = [k for k in value if k not in _NODE_TYPE_KEYS]
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}. "
                f"Fix: use any of {', '.join(_NODE_TYPE_KEYS)}."
            )
        from ascend._resources import Resources  # imports this module

        gpu: Any = value.get("gpu", 0)
        product = value.get("product")
        if product is not None:
            if isinstance(gpu, str | list | tuple):
                raise ConfigError(
                    f"{where}: give the model either in gpu (e.g. gpu = 'L4:2') or in product "
                    "with gpu as a count, not both."
                )
            count = gpu or 1
            models = [product] if isinstance(product, str) else product
            if not isinstance(models, list | tuple) or not all(isinstance(m, str) for m in models):
                raise ConfigError(f"{where}: product must be a GPU model or a list of them.")
            gpu = [f"{m}:{count}" for m in models]
            gpu = gpu[0] if isinstance(product, str) else gpu
        try:
            checked = Resources.build(gpu=gpu, gpu_memory=value.get("gpu_memory"))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        selector = value.get("selector") or {}
        if not isinstance(selector, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
        ):
            raise ConfigError(
                f"{where}: selector must map node label names to values (strings), e.g. "
                "selector = { 'cloud.google.com/gke-accelerator' = 'nvidia-l4' }."
            )
        tolerations = value.get("tolerations") or []
        if not isinstance(tolerations, list | tuple) or not all(
            isinstance(t, Mapping) and set(t) <= _TOLERATION_KEYS for t in tolerations
        ):
            raise ConfigError(
                f"{where}: tolerations must be a list of Kubernetes tolerations, tables with "
                f"keys among {', '.join(sorted(_TOLERATION_KEYS))}."
            )
        return cls(
            name=name,
            gpu=checked.gpu,
            gpu_memory=checked.gpu_memory,
            selector=dict(selector),
            tolerations=tuple(dict(t) for t in tolerations),
        )


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_ENV = {
    "backend": "ASCEND_BACKEND",
    "storage": "ASCEND_STORAGE",
    "storage_options": "ASCEND_STORAGE_OPTIONS",
    "project": "ASCEND_PROJECT",
    "user": "ASCEND_USER",
    "namespace": "ASCEND_NAMESPACE",
    "kubeconfig": "ASCEND_KUBECONFIG",
    "context": "ASCEND_CONTEXT",
    "image": "ASCEND_IMAGE",
    "storage_secret": "ASCEND_STORAGE_SECRET",
    "max_workers": "ASCEND_MAX_WORKERS",
    "stream_logs": "ASCEND_STREAM_LOGS",
    "detach": "ASCEND_DETACH",
    "progress": "ASCEND_PROGRESS",
    "unschedulable_grace": "ASCEND_UNSCHEDULABLE_GRACE",
    "kubernetes_writes_per_second": "ASCEND_KUBERNETES_WRITES_PER_SECOND",
    "blob_threshold": "ASCEND_BLOB_THRESHOLD",
    "session_lease_seconds": "ASCEND_SESSION_LEASE_SECONDS",
    "session_reaper_seconds": "ASCEND_SESSION_REAPER_SECONDS",
    "preflight": "ASCEND_PREFLIGHT",
    "base_image": "ASCEND_BASE_IMAGE",
    "index_url": "ASCEND_INDEX_URL",
    "extra_index_url": "ASCEND_EXTRA_INDEX_URL",
    "find_links": "ASCEND_FIND_LINKS",
    "build": "ASCEND_BUILD",
    "startup_timeout": "ASCEND_STARTUP_TIMEOUT",
    "registry": "ASCEND_REGISTRY",
    "registry_secret": "ASCEND_REGISTRY_SECRET",
    "termination_grace": "ASCEND_TERMINATION_GRACE",
}


def _coerce(name: str, raw: str, source: str) -> Any:
    """Turn an environment string into the field's type."""
    kind = _FIELDS[name].type
    try:
        if name == "storage_options":
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            return value
        if "bool" in str(kind):
            lowered = raw.strip().lower()
            if name == "stream_logs" and lowered == "failed":
                return "failed"
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            if lowered in ("", "auto", "none") and "None" in str(kind):
                return None
            accepted = "1/0, true/false, yes/no or on/off"
            if "None" in str(kind):
                accepted += ", or auto (empty, none) for the default"
            if name == "stream_logs":
                accepted += ", or failed"
            raise ValueError(f"expected {accepted}")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{source} = {raw!r} is invalid for {name}: {exc}.") from exc
    return raw


def _check_table(table: Mapping[str, Any], source: str) -> dict[str, Any]:
    unknown = [key for key in table if key not in _FIELDS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{source}: unknown setting {key!r}.{hint} Known settings: {', '.join(_FIELDS)}."
        )
    return dict(table)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}. Fix the file.") from exc


def _find_pyproject(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _layers() -> list[tuple[str, dict[str, Any]]]:
    """Every source below explicit arguments, lowest precedence first."""
    layers: list[tuple[str, dict[str, Any]]] = []
    user_file = user_config_path()
    if user_file.is_file():
        layers.append((str(user_file), _check_table(_read_toml(user_file), str(user_file))))
    pyproject = _find_pyproject(Path.cwd())
    if pyproject is not None:
        table = _read_toml(pyproject).get("tool", {}).get("ascend", {})
        source = f"{pyproject} [tool.ascend]"
        layers.append((source, _check_table(table, source)))
    env = {
        name: _coerce(name, os.environ[var], var) for name, var in _ENV.items() if var in os.environ
    }
    layers.append(("environment", env))
    return layers


def resolve(overrides: Mapping[str, Any]) -> Settings:
    """Merge defaults, the user file, pyproject, environment and ``overrides``."""
    merged: dict[str, Any] = {}
    for _source, values in _layers():
        merged.update(values)
    merged.update({k: v for k, v in _check_table(overrides, "configure()").items()})
    return Settings(**merged)


_lock = threading.Lock()
_overrides: dict[str, Any] = {}
_current: Settings | None = None


def configure(**overrides: Any) -> Settings:
    """Set ascend's settings for this process and return the resolved result.

    Arguments override ``ASCEND_*`` environment variables, ``[tool.ascend]`` in
    ``pyproject.toml`` and the user config file. Later calls update earlier ones;
    pass ``None`` to drop an earlier override. Calls already submitted keep the
    settings they were made with.

    Example::

        ascend.configure(backend="kubernetes", storage="s3://my-bucket/ascend",
                         namespace="ml-team")
    """
    global _current
    with _lock:
        candidate = {**_overrides, **overrides}
        candidate = {k: v for k, v in candidate.items() if v is not None}
        settings = resolve(candidate)
        _overrides.clear()
        _overrides.update(candidate)
        _current = settings
        return settings


def current() -> Settings:
    """The settings in force (resolved on first use, then cached until ``configure``)."""
    global _current
    with _lock:
        if _current is None:
            _current = resolve(_overrides)
        return _current


def reset() -> None:
    """Forget overrides and cached settings (tests, or after changing the environment)."""
    global _current
    with _lock:
        _overrides.clear()
        _current = None
