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
        blob_threshold: buffers and arguments of at least this many bytes are stored
            once under their SHA-256 digest and shared by every call that passes them.
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

    def __post_init__(self) -> None:
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
            raise ValueError("expected true or false")
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
