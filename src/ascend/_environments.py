"""Environments: a function's requirements and the runner, built once per content.

An environment is identified by its :class:`EnvironmentSpec` — base image (and its
digest when pinned), Python ``major.minor``, target platform, the normalised requirement
set, indexes, constraints (what the runner needs, pinned to this client's versions) and
the builder's version. Its :attr:`~EnvironmentSpec.key` is the SHA-256 of that spec's
canonical JSON: order-insensitive and the same on every machine.

In *bucket* mode (the default) an environment is a deterministic ``.tar.gz`` of a
``uv pip install --target`` folder, stored content-addressed in the job storage::

    {storage}/envs/sha256/{key}.tar.gz     the archive
    {storage}/envs/sha256/{key}.json       its manifest (written last: the env exists)
    {storage}/envs/sha256/{key}.lock       a build in progress (create-only)

A pod (or the local backend's process) starts from a stock Python, runs the stdlib-only
bootstrap (:mod:`ascend_runner._bootstrap`), which fetches, verifies and unpacks the
archive and runs the runner inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import socket
import sys
import sysconfig
import tempfile
import time
import tomllib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import anyio
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ascend._config import Settings
from ascend._errors import ConfigError, ImageBuildError, StartupTimeout, StorageError
from ascend._logging import logger
from ascend._storage import Storage
from ascend_runner import _envbuild

log = logger

BUILDER_VERSION: Final = "2"  # 2: environments carry their modules' bytecode
"""Changes whenever the same spec would build a different environment."""
HOST: Final = "host"
"""The platform of environments built for (and run by) this machine's own Python."""
DEFAULT_PLATFORM: Final = "linux/amd64"
RUNNER_DIST: Final = "ascend-k8s-runner"
PINNED: Final = ("cloudpickle",)
"""Runner dependencies pinned exactly to the client's versions (the pickle protocol)."""
_TAIL_LINES: Final = 40
_POLL: Final = 0.25
_UV_PLATFORMS: Final = {
    # python:X.Y-slim is Debian (glibc >= 2.36): wheels for manylinux_2_36 and older run.
    "linux/amd64": "x86_64-manylinux_2_36",
    "linux/arm64": "aarch64-manylinux_2_36",
}
_STORAGE_EXTRAS: Final = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure"}
_STORAGE_EXTRAS.update({"abfs": "azure", "abfss": "azure"})


# -- the spec --------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvironmentSpec:
    """Everything that determines an environment's contents. Build with :func:`spec_for`.

    Attributes:
        base_image: the image the environment runs on (``"host"`` for local runs).
        base_digest: its ``sha256:...`` digest when pinned (``image@sha256:...``).
        python: ``"3.11"``.
        platform: ``"linux/amd64"``, ``"linux/arm64"`` or ``"host:<platform tag>"``.
        requirements: normalised requirement strings, sorted, the runner's included.
        constraints: ``name==version`` pins, sorted (cloudpickle; a ``uv.lock``'s pins).
        index_url: the index (``None``: uv's default), ``"none"`` for no index.
        extra_index_urls, find_links: further sources, sorted.
        runner: SHA-256 of the runner's source files (the runner travels in the env).
        builder: :data:`BUILDER_VERSION`.
    """

    base_image: str
    base_digest: str | None
    python: str
    platform: str
    requirements: tuple[str, ...]
    constraints: tuple[str, ...]
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    runner: str = ""
    builder: str = BUILDER_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> EnvironmentSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in value.items()
        }
        return cls(**{k: v for k, v in values.items() if k in fields})

    @property
    def key(self) -> str:
        """The environment's content key: 64 hex digits."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def is_host(self) -> bool:
        return self.platform.startswith(f"{HOST}:")


def normalise_requirement(text: str, where: str = "requirements") -> str:
    """One canonical spelling: canonical name, sorted extras and specifiers, marker."""
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise ConfigError(
            f"{where}: {text!r} is not a valid requirement: {exc}. Fix: use the pip syntax, "
            "e.g. 'numpy>=2'."
        ) from exc
    out = str(canonicalize_name(req.name))
    if req.extras:
        out += f"[{','.join(sorted(canonicalize_name(e) for e in req.extras))}]"
    if req.url:
        out += f" @ {req.url}"
    elif req.specifier:
        out += ",".join(sorted(str(s) for s in req.specifier))
    if req.marker is not None:
        out += f" ; {req.marker}"
    return out


@dataclass
class _Collected:
    requirements: list[str] = dataclasses.field(default_factory=list)
    constraints: list[str] = dataclasses.field(default_factory=list)
    index_url: str | None = None
    extra_index_urls: list[str] = dataclasses.field(default_factory=list)
    find_links: list[str] = dataclasses.field(default_factory=list)


def _read_requirements_txt(path: Path, into: _Collected, seen: set[Path]) -> None:
    if path in seen:
        return
    seen.add(path)
    text = path.read_text().replace("\\\n", " ")
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        where = f"{path}:{number}"
        option, _, rest = line.partition(" ")
        if "=" in option and option.startswith("--"):
            option, _, rest = option.partition("=")
        rest = rest.strip()
        if option in ("-r", "--requirement"):
            _read_requirements_txt((path.parent / rest).resolve(), into, seen)
        elif option in ("-c", "--constraint"):
            inner = _Collected()
            _read_requirements_txt((path.parent / rest).resolve(), inner, set())
            into.constraints.extend(inner.requirements)
        elif option in ("-i", "--index-url"):
            into.index_url = rest
        elif option == "--extra-index-url":
            into.extra_index_urls.append(rest)
        elif option in ("-f", "--find-links"):
            into.find_links.append(rest)
        elif option in ("-e", "--editable"):
            raise ConfigError(
                f"{where}: editable requirement {rest!r} cannot be installed in a remote "
                "environment. Fix: build a wheel of it and add its folder to find_links, or "
                "list the package by name."
            )
        elif line.startswith("-"):
            raise ConfigError(
                f"{where}: the option {option!r} is not supported in requirements for a remote "
                "environment. Fix: remove it (indexes go in index_url / extra_index_url / "
                "find_links)."
            )
        else:
            requirement = re.sub(r"\s--hash[= ]\S+", "", line).strip()
            into.requirements.append(normalise_requirement(requirement, where))


def _read_pyproject(path: Path, into: _Collected) -> None:
    try:
        project = tomllib.loads(path.read_text()).get("project", {})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}. Fix the file.") from exc
    if "dependencies" in project.get("dynamic", []):
        raise ConfigError(
            f"{path}: [project] dependencies are dynamic, so they cannot be read. Fix: pass "
            "a requirements.txt or a list."
        )
    for dep in project.get("dependencies", []):
        into.requirements.append(normalise_requirement(dep, str(path)))


def _read_uv_lock(path: Path, into: _Collected) -> None:
    """The root project's dependencies as requirements, every locked version as a pin."""
    try:
        packages = tomllib.loads(path.read_text()).get("package", [])
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}. Fix the file.") from exc
    roots = [
        p
        for p in packages
        if isinstance(p.get("source"), dict) and {"editable", "virtual"} & set(p["source"])
    ]
    if not roots:
        raise ConfigError(
            f"{path}: no project of its own (an editable or virtual source) found. Fix: "
            "pass the lock file of a uv project."
        )
    root_names = {canonicalize_name(p["name"]) for p in roots}
    for root in roots:
        for dep in root.get("dependencies", []):
            if canonicalize_name(dep["name"]) in root_names:
                continue
            text = dep["name"] + (f"[{','.join(dep['extra'])}]" if dep.get("extra") else "")
            if dep.get("marker"):
                text += f" ; {dep['marker']}"
            into.requirements.append(normalise_requirement(text, str(path)))
    for package in packages:
        if canonicalize_name(package["name"]) not in root_names and package.get("version"):
            into.constraints.append(f"{canonicalize_name(package['name'])}=={package['version']}")


def collect_requirements(requirements: Iterable[str]) -> _Collected:
    """Requirement strings and ``-r path`` entries, read and normalised.

    Raises:
        ConfigError: a file cannot be read or holds something a remote environment
            cannot install (an editable requirement, an unsupported option).
    """
    into = _Collected()
    for item in requirements:
        if not item.startswith("-r "):
            into.requirements.append(normalise_requirement(item))
            continue
        path = Path(item[3:].strip())
        try:
            if path.name == "pyproject.toml":
                _read_pyproject(path, into)
            elif path.name == "uv.lock" or path.suffix == ".lock":
                _read_uv_lock(path, into)
            else:
                _read_requirements_txt(path, into, set())
        except OSError as exc:
            raise ConfigError(
                f"cannot read the requirements file {path}: {exc}. Fix: check the path."
            ) from exc
    return into


def _runner_source_files() -> list[tuple[str, Path]]:
    import ascend_runner

    root = Path(ascend_runner.__file__).parent
    return sorted(
        (f"ascend_runner/{p.relative_to(root).as_posix()}", p)
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed")
    )


@functools.cache
def runner_digest() -> str:
    """SHA-256 over the runner's source files (names and bytes)."""
    h = hashlib.sha256()
    for name, path in _runner_source_files():
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _runner_requirements(storage: str) -> list[str]:
    """The runner's own dependencies, with the extra its storage needs."""
    extra = _STORAGE_EXTRAS.get(storage.split("://", 1)[0] if "://" in storage else "file")
    return list(_runner_requirements_for(extra))


@functools.cache
def _runner_requirements_for(extra: str | None) -> tuple[str, ...]:
    out = []
    for text in importlib.metadata.requires(RUNNER_DIST) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": extra or ""}):
            continue
        req.marker = None
        out.append(normalise_requirement(str(req)))
    return tuple(out)


@functools.cache
def _installed_version(name: str) -> str:
    return importlib.metadata.version(name)


def _pins(conflicts_with: Sequence[str]) -> list[str]:
    """``cloudpickle==<client's>``; a user requirement that excludes it is refused."""
    pins = []
    for name in PINNED:
        version = _installed_version(name)
        pins.append(f"{name}=={version}")
        for text in conflicts_with:
            req = Requirement(text)
            if canonicalize_name(req.name) == name and not req.specifier.contains(
                version, prereleases=True
            ):
                raise ConfigError(
                    f"requirement {text!r} conflicts with the runner: the environment must "
                    f"have {name}=={version}, the version this client pickles with (a "
                    "different one cannot read its packages). Fix: drop the requirement, or "
                    f"install {name} {req.specifier} on this machine too."
                )
    return pins


def _split(value: str | None) -> list[str]:
    return [v for v in re.split(r"[\s,]+", value or "") if v]


def _base_image(image: str) -> tuple[str, str | None]:
    name, sep, digest = image.partition("@")
    if sep and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ConfigError(
            f"base_image {image!r}: {digest!r} is not a sha256 digest. Fix: use "
            "'name:tag' or 'name@sha256:<64 hex digits>'."
        )
    return name, digest or None


def spec_for(
    settings: Settings,
    requirements: Iterable[str],
    *,
    base_image: str | None = None,
    platform: str | None = None,
) -> EnvironmentSpec:
    """The environment for these requirements under these settings.

    Args:
        requirements: requirement strings and ``-r /path`` entries (``Resources``' form).
        base_image: per-function override of ``settings.base_image``.
        platform: ``"linux/amd64"`` (default for Kubernetes), ``"linux/arm64"``, or
            :data:`HOST` for environments run by this machine's Python (local backend).

    Raises:
        ConfigError: a requirement or file is invalid, or a requirement conflicts with
            the runner's pinned dependencies (cloudpickle).
    """
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    collected = collect_requirements(requirements)
    user = sorted(set(collected.requirements))
    pins = _pins(user + collected.constraints)
    for pin in pins:  # a lock file's own pin of a pinned package is superseded
        name = pin.split("==")[0]
        collected.constraints = [c for c in collected.constraints if c.split("==")[0] != name]
    target = platform or DEFAULT_PLATFORM
    if target == HOST:
        target = f"{HOST}:{sysconfig.get_platform()}-{sys.implementation.name}"
        image, digest = HOST, None
    elif target in _UV_PLATFORMS:
        image, digest = _base_image(base_image or settings.base_image or f"python:{python}-slim")
    else:
        raise ConfigError(
            f"platform {target!r} is not supported. Fix: use one of {', '.join(_UV_PLATFORMS)}."
        )
    index_url = collected.index_url or settings.index_url
    return EnvironmentSpec(
        base_image=image,
        base_digest=digest,
        python=python,
        platform=target,
        requirements=tuple(sorted(set(user + _runner_requirements(settings.storage)))),
        constraints=tuple(sorted(set(pins + collected.constraints))),
        index_url=index_url,
        extra_index_urls=tuple(
            sorted(set(collected.extra_index_urls + _split(settings.extra_index_url)))
        ),
        find_links=tuple(sorted(set(collected.find_links + _split(settings.find_links)))),
        runner=runner_digest(),
    )


# -- where environments live -----------------------------------------------------------


@dataclass(frozen=True)
class EnvPaths:
    """Every storage path of one environment (see the module docstring)."""

    folder: str
    key: str

    @classmethod
    def of(cls, settings: Settings, key: str) -> EnvPaths:
        return cls(envs_folder(settings), key)

    @property
    def archive(self) -> str:
        return f"{self.folder}/{self.key}.tar.gz"

    @property
    def manifest(self) -> str:
        return f"{self.folder}/{self.key}.json"

    @property
    def lock(self) -> str:
        return f"{self.folder}/{self.key}.lock"

    @property
    def failure(self) -> str:
        return f"{self.folder}/{self.key}.failed"


def envs_folder(settings: Settings) -> str:
    """Environments are shared by every user and project of a storage."""
    return f"{settings.storage.rstrip('/')}/envs/sha256"


@dataclass(frozen=True)
class Environment:
    """A built environment: where its archive is and what it must hash to."""

    spec: EnvironmentSpec
    archive: str
    sha256: str
    size: int
    built: bool = False
    """Whether this request built it (``False``: it existed, or another request built it)."""
    image: str | None = None
    """Registry mode: the image (``host/repo@sha256:...``) the runner runs on directly."""

    @property
    def key(self) -> str:
        return self.spec.key


# -- building --------------------------------------------------------------------------


def uv_binary() -> str:
    """The ``uv`` executable: ``$ASCEND_UV``, the ``uv`` package's, or ``uv`` on PATH.

    Raises:
        ConfigError: none is available.
    """
    if os.environ.get("ASCEND_UV"):
        return os.environ["ASCEND_UV"]
    with contextlib.suppress(ImportError, FileNotFoundError):
        from uv import find_uv_bin  # type: ignore[import-not-found]

        return str(find_uv_bin())
    found = shutil.which("uv")
    if found is None:
        raise ConfigError(
            "building an environment on this machine needs uv, which is not installed. "
            "Fix: pip install 'ascend-k8s[build]' (or put uv on PATH, or set ASCEND_UV)."
        )
    return found


def uv_options(spec: EnvironmentSpec) -> list[str]:
    """The ``uv pip install`` options of ``spec``: interpreter or target platform, indexes."""
    args = ["--no-config", "--color", "never", "--no-progress", "--link-mode", "copy"]
    if spec.is_host:
        args += ["--python", sys.executable]
    else:
        # Wheels only: sdists would be built for the builder's machine, not the target.
        args += ["--python-version", spec.python]
        args += ["--python-platform", _UV_PLATFORMS[spec.platform], "--no-build"]
    return args + _index_args(spec, "uv")


# How uv and pip spell the spec's package sources.
_INDEX_FLAGS: Final = {
    "uv": {"default": "--default-index", "extra": "--index"},
    "pip": {"default": "--index-url", "extra": "--extra-index-url"},
}


def _index_args(spec: EnvironmentSpec, tool: str) -> list[str]:
    flags = _INDEX_FLAGS[tool]
    args = []
    if spec.index_url == "none":
        args.append("--no-index")
    elif spec.index_url:
        args += [flags["default"], spec.index_url]
    for url in spec.extra_index_urls:
        args += [flags["extra"], url]
    for link in spec.find_links:
        args += ["--find-links", link]
    return args


def uv_command(
    spec: EnvironmentSpec, target: str, requirements: str, constraints: str
) -> list[str]:
    """The ``uv`` arguments that build ``spec`` into ``target`` (a folder)."""
    files = ["--requirements", requirements, "--constraints", constraints]
    return ["pip", "install", "--target", target, *files, *uv_options(spec)]


def build_inputs(spec: EnvironmentSpec) -> tuple[str, str]:
    """The requirements and constraints files' text for uv."""
    return (
        "".join(f"{r}\n" for r in spec.requirements),
        "".join(f"{c}\n" for c in spec.constraints),
    )


_deterministic_tar = _envbuild.deterministic_tar


def _pack_file(folder: Path, dest: Path) -> tuple[str, int]:
    """The environment's archive written to ``dest`` (streamed); its sha256 and size."""
    with dest.open("wb") as out:
        entries = _envbuild.sorted_entries(folder, bytecode=True)
        digest, _, size = _envbuild.pack(folder, entries, out)
    return digest, size


async def _upload_file(storage: Storage, url: str, path: Path, sha256: str) -> None:
    """Store a file without reading it into memory: the store reads a mapping of it,
    checked against ``sha256`` (hex) before it is written."""
    import mmap

    def open_mapped() -> tuple[Any, mmap.mmap]:
        f = path.open("rb")
        return f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    f, mapped = await anyio.to_thread.run_sync(open_mapped)
    try:
        with memoryview(mapped) as view:
            await storage.put_blob(url, view, sha256)
    finally:
        mapped.close()
        f.close()


def runner_archive() -> bytes:
    """The runner's source files as a deterministic archive (for in-cluster builds)."""
    with tempfile.TemporaryDirectory(prefix="ascend-runner-") as tmp:
        add_runner(Path(tmp))
        return _deterministic_tar(Path(tmp))


def add_runner(folder: Path) -> None:
    """Copy this client's runner into the environment (it is not on any index)."""
    for name, path in _runner_source_files():
        dest = folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


_NO_WHEEL = re.compile(
    r"(?:no wheels with a matching (?:platform|Python)|has no usable wheels|"
    r"building from source is disabled|only has source distributions)",
    re.IGNORECASE,
)


PYPI: Final = "https://pypi.org/simple"
# A package index that could not be reached, as uv (its error's causes) and pip (urllib3's
# retry warnings) word it: refused, no such host, no answer.
_UNREACHABLE = re.compile(
    r"connection refused|tcp connect error|dns error|error resolving dns|"
    r"failed to lookup address|name or service not known|nodename nor servname|"
    r"temporary failure in name resolution|no address associated with hostname|"
    r"failed to resolve|newconnectionerror|failed to establish a new connection|"
    r"operation timed out|connecttimeout|read ?timed ?out|readtimeouterror|"
    r"network is unreachable|no route to host",
    re.IGNORECASE,
)
# ... while talking to an index (not, say, while publishing the archive afterwards).
_INDEX_CONTEXT = re.compile(
    r"Failed to fetch|error sending request for url|Retrying \(Retry\(|Could not fetch URL",
    re.IGNORECASE,
)
_FETCHED = re.compile(
    r"(?:Failed to fetch:?|error sending request for url \(|Could not fetch URL)\s*"
    r"(https?://[^\s)]+)",
    re.IGNORECASE,
)


def _without_credentials(url: str) -> str:
    """``url`` without a ``user:token@`` part (an index URL may carry one)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def unreachable_index(spec: EnvironmentSpec, text: str) -> tuple[str, str, str] | None:
    """When a build log says a package index could not be reached (connection refused,
    no such host, timed out): ``(url, setting, cause)`` — the index's URL as configured
    (credentials removed), the setting that names it (``index_url``,
    ``extra_index_url`` or ``find_links``) and the log's line saying why. ``None`` for
    any other failure."""
    match = _UNREACHABLE.search(text)
    if match is None or _INDEX_CONTEXT.search(text) is None:
        return None
    start = text.rfind("\n", 0, match.start()) + 1
    end = text.find("\n", match.end())
    cause = text[start : end if end >= 0 else len(text)].strip().removeprefix("cause: ")
    sources: list[tuple[str, str]] = []
    if spec.index_url != "none":
        sources.append((spec.index_url or PYPI, "index_url"))
    sources += [(url, "extra_index_url") for url in spec.extra_index_urls]
    sources += [(url, "find_links") for url in spec.find_links if "://" in url]
    fetched = _FETCHED.search(text)
    if fetched is not None:
        from urllib.parse import urlsplit

        url = fetched.group(1)
        for source, setting in sources:
            if url.startswith(source.rstrip("/")):
                return _without_credentials(source), setting, cause
        for source, setting in sources:
            if urlsplit(source).hostname == urlsplit(url).hostname:
                return _without_credentials(source), setting, cause
        return _without_credentials(url), "index_url", cause
    for source, setting in sources:  # pip names only the path: the first that is named
        from urllib.parse import urlsplit

        host = urlsplit(source).hostname or ""
        if host and host in text:
            return _without_credentials(source), setting, cause
    if sources:
        return _without_credentials(sources[0][0]), sources[0][1], cause
    return None


def build_error(
    spec: EnvironmentSpec, tail: Sequence[str], what: str, *, in_cluster: bool = False
) -> ImageBuildError:
    """The error of a failed build: the requirement the log names, the way out, the tail.

    A package index that could not be reached blames no requirement: the message names
    the index, its setting and the cause (``in_cluster``: the build ran in a pod, so the
    cluster's network is the one that could not reach it)."""
    text = "\n".join(tail)
    unreachable = unreachable_index(spec, text)
    if unreachable is not None:
        url, setting, cause = unreachable
        where = "the cluster's build pod" if in_cluster else "this machine"
        env = {"index_url": "ASCEND_INDEX_URL", "extra_index_url": "ASCEND_EXTRA_INDEX_URL"}
        named = f"{setting}=... ({env.get(setting, 'ASCEND_FIND_LINKS')})"
        if setting == "index_url" and spec.index_url is None:
            named = "index_url=... (ASCEND_INDEX_URL; unset, uv's default, PyPI, was used)"
        return ImageBuildError(
            f"environment {spec.key[:12]} ({what}): the build failed: the package index "
            f"{url} is unreachable from {where} ({cause}), so no requirement could be "
            f"resolved; the requirements are not at fault. Fix: check that {where} can "
            f"reach it (network, proxy, DNS, the server running), or set {named} to an "
            "index it can reach"
            + (
                " (a namespace's ascend-defaults ConfigMap gives its builds one)"
                if in_cluster
                else ""
            )
            + f".\nLast lines of the build log:\n{text}",
            requirement=None,
            log=text,
        )
    failing = None
    for req in spec.requirements:
        name = Requirement(req).name
        if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", text, re.IGNORECASE):
            failing = req
            break
    subject = f"requirement {failing!r}" if failing else "the requirement set"
    if _NO_WHEEL.search(text):
        target = "this machine" if spec.is_host else f"{spec.platform} / Python {spec.python}"
        fix = (
            f"{subject} has no wheel for {target}. Fix: pin a version that publishes a wheel "
            "for it, build the wheel yourself and add its folder to find_links=..., or use a "
            "base_image (or image=) that already contains it."
        )
    else:
        fix = f"{subject} could not be installed. Fix: correct or relax it (the log says why)."
    return ImageBuildError(
        f"environment {spec.key[:12]} ({what}): the build failed: {fix}\n"
        f"Last lines of the build log:\n{text}",
        requirement=failing,
        log=text,
    )


async def build_archive(
    spec: EnvironmentSpec, on_line: Callable[[str], None] | None = None
) -> bytes:
    """Install ``spec`` with uv into a temporary folder and return its deterministic
    archive. Every line of uv's output goes to ``on_line``.

    Raises:
        ImageBuildError: uv failed (the message names the requirement and the way out).
        ConfigError: uv is not installed.
    """
    async with installed(spec, on_line) as target:
        return await anyio.to_thread.run_sync(
            functools.partial(_deterministic_tar, target, bytecode=True)
        )


@contextlib.asynccontextmanager
async def installed(
    spec: EnvironmentSpec, on_line: Callable[[str], None] | None = None
) -> AsyncIterator[Path]:
    """A temporary folder holding ``spec`` installed with uv, the runner included.

    Raises:
        ImageBuildError: uv failed (the message names the requirement and the way out).
        ConfigError: uv is not installed.
    """
    uv = await anyio.to_thread.run_sync(uv_binary)
    root = Path(await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="ascend-env-")))
    try:
        reqs, cons = build_inputs(spec)
        await anyio.Path(root / "requirements.txt").write_text(reqs)
        await anyio.Path(root / "constraints.txt").write_text(cons)
        target = root / "env"
        files = (str(root / "requirements.txt"), str(root / "constraints.txt"))
        command = [uv, *uv_command(spec, str(target), *files)]
        tail: deque[str] = deque(maxlen=_TAIL_LINES)

        def emit(raw: bytes) -> None:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            if on_line is not None:
                on_line(line)

        async def pump(stream: Any) -> None:
            pending = b""
            async for chunk in stream:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    emit(raw)
            if pending:
                emit(pending)

        env = {**os.environ, "NO_COLOR": "1", "UV_NO_PROGRESS": "1"}
        try:
            process = await anyio.open_process(command, env=env)
        except OSError as exc:
            raise ConfigError(
                f"cannot run uv ({uv}): {exc}. Fix: pip install 'ascend-k8s[build]', put uv "
                "on PATH, or point ASCEND_UV at it."
            ) from exc
        async with process:
            try:
                async with anyio.create_task_group() as tg:
                    for stream in (process.stdout, process.stderr):
                        if stream is not None:
                            tg.start_soon(pump, stream)
                code = await process.wait()
            except BaseException:
                # Cancelled (the call was, or startup_timeout passed): stop uv now rather
                # than wait for it.
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                raise
        if code != 0:
            raise build_error(spec, tail, f"uv exited with code {code}")
        await anyio.to_thread.run_sync(add_runner, target)
        if spec.is_host or spec.python == "{}.{}".format(*sys.version_info[:2]):
            # This interpreter's bytecode is the target's (another version's is not).
            await anyio.to_thread.run_sync(_envbuild.compile_bytecode, target)
        yield target
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, root, True)


# -- one build per environment ----------------------------------------------------------


@dataclass
class _Flight:
    """One request in progress for a key; others in this process wait for its outcome."""

    done: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    error: ImageBuildError | None = None


_inflight: dict[str, _Flight] = {}


def _lock_body() -> bytes:
    return json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "created": time.time()}
    ).encode()


async def _create_only(storage: Storage, url: str, body: bytes) -> bool:
    """Create ``url`` unless it exists (hard link on local files, conditional PUT on
    object stores); whether this call created it."""
    from ascend_runner import _storage as runner_storage

    options = dict(storage._options)
    attempt = secrets.token_hex(6)
    try:
        return await anyio.to_thread.run_sync(
            runner_storage.publish_once, url, [body], options, attempt
        )
    except Exception as exc:
        raise StorageError(f"cannot create {url}: {exc!r}") from exc


async def _load(storage: Storage, paths: EnvPaths, spec: EnvironmentSpec) -> Environment | None:
    """The built environment, or ``None`` when it must be built: no manifest, or a
    manifest whose archive is gone (a bucket lifecycle rule, a manual delete)."""
    try:
        manifest = await storage.read_json(paths.manifest)
    except FileNotFoundError:
        return None
    if not await storage.exists(paths.archive):
        log.warning("environment archive missing; rebuilding", archive=paths.archive)
        return None
    return Environment(spec, paths.archive, manifest["sha256"], manifest["size"])


async def ensure(
    settings: Settings,
    spec: EnvironmentSpec,
    storage: Storage,
    on_line: Callable[[str], None] | None = None,
    *,
    stale_after: float | None = None,
) -> Environment:
    """The built environment for ``spec``: found in storage, or built here once.

    Concurrent requests for one key — in this process or any other sharing the storage
    — produce one build: the first creates ``{key}.lock`` (create-only), the others wait
    for the manifest. A lock older than ``stale_after`` seconds (default
    ``settings.startup_timeout``) is taken to be a dead builder's and removed.

    Raises:
        ImageBuildError: the build failed (here, or in the request this one waited for).
        StartupTimeout: the environment was not ready within ``settings.startup_timeout``.
    """
    key = spec.key
    paths = EnvPaths.of(settings, key)
    while key in _inflight:
        flight = _inflight[key]
        await flight.done.wait()
        if flight.error is not None:  # the same build would fail the same way: share it
            error = flight.error
            raise ImageBuildError(str(error), requirement=error.requirement, log=error.log)
    flight = _inflight[key] = _Flight()
    try:
        with anyio.fail_after(settings.startup_timeout):
            return await _ensure(settings, spec, storage, paths, on_line, stale_after)
    except ImageBuildError as exc:
        flight.error = exc
        raise
    except TimeoutError as exc:
        raise StartupTimeout(
            f"environment {key[:12]} was not ready within startup_timeout="
            f"{settings.startup_timeout:g} s (it is still building, or its builder died "
            f"holding {paths.lock}). Fix: raise startup_timeout, or delete the lock."
        ) from exc
    finally:
        del _inflight[key]
        flight.done.set()


async def _ensure(
    settings: Settings,
    spec: EnvironmentSpec,
    storage: Storage,
    paths: EnvPaths,
    on_line: Callable[[str], None] | None,
    stale_after: float | None,
) -> Environment:
    stale = settings.startup_timeout if stale_after is None else stale_after
    waited_for_someone = False
    while True:
        found = await _load(storage, paths, spec)
        if found is not None:
            return found
        if await _create_only(storage, paths.lock, _lock_body()):
            break
        if not waited_for_someone and on_line is not None:
            on_line(f"waiting for another build of environment {spec.key[:12]}")
        waited_for_someone = True
        await _wait_for_other(storage, paths, spec, stale)
    try:
        found = await _load(storage, paths, spec)  # finished between our checks
        if found is not None:
            return found
        await storage.delete(paths.failure)
        log.info("building environment", key=spec.key, requirements=list(spec.requirements))
        try:
            async with installed(spec, on_line) as target:
                archive = target.parent / "env.tar.gz"
                digest, size = await anyio.to_thread.run_sync(_pack_file, target, archive)
                await _upload_file(storage, paths.archive, archive, digest)
        except ImageBuildError as exc:
            with anyio.CancelScope(shield=True):
                await storage.write_json(
                    paths.failure,
                    {"message": str(exc), "requirement": exc.requirement, "log": exc.log},
                )
            raise
        manifest = {
            "key": spec.key,
            "spec": spec.to_json(),
            "sha256": digest,
            "size": size,
            "created": time.time(),
            "builder": BUILDER_VERSION,
        }
        await storage.write_json(paths.manifest, manifest)
        return Environment(spec, paths.archive, digest, size, built=True)
    finally:
        with anyio.CancelScope(shield=True):
            await storage.delete(paths.lock)


async def _wait_for_other(
    storage: Storage, paths: EnvPaths, spec: EnvironmentSpec, stale: float
) -> None:
    """Until another builder's lock goes; raise its failure if it failed."""
    while True:
        try:
            lock = json.loads(bytes(await storage.read(paths.lock)))
        except FileNotFoundError:
            break
        except (ValueError, TypeError):
            lock = {"created": 0.0}  # a torn lock file: judge it by age alone
        if time.time() - float(lock.get("created", 0.0)) > stale:
            log.warning("removing a stale environment build lock", lock=paths.lock)
            await storage.delete(paths.lock)
            return
        await anyio.sleep(_POLL)
    if await storage.exists(paths.manifest):
        return
    try:
        failure = await storage.read_json(paths.failure)
    except FileNotFoundError:
        return
    raise ImageBuildError(
        failure["message"], requirement=failure.get("requirement"), log=failure.get("log", "")
    )


# -- listing and pruning (the ``ascend env`` command) ----------------------------------


async def list_environments(settings: Settings) -> list[dict[str, Any]]:
    """Every built environment in the storage: its manifest (key, spec, sha256, size,
    created), oldest first."""
    folder = envs_folder(settings)
    out = []
    async with Storage(settings.storage, settings.storage_options) as storage:
        for name in await storage.list(folder):
            if name.endswith(".json"):
                with contextlib.suppress(FileNotFoundError, ValueError):
                    out.append(await storage.read_json(f"{folder}/{name}"))
    return sorted(out, key=lambda m: (m.get("created", 0), m.get("key", "")))


async def show_environment(settings: Settings, key_prefix: str) -> dict[str, Any]:
    """The manifest of the one environment whose key starts with ``key_prefix``.

    Raises:
        ConfigError: no environment, or more than one, matches.
    """
    matches = [m for m in await list_environments(settings) if m["key"].startswith(key_prefix)]
    if len(matches) != 1:
        found = "no environment" if not matches else f"{len(matches)} environments"
        raise ConfigError(
            f"{found} in {envs_folder(settings)} has a key starting with {key_prefix!r}. "
            "Fix: give a longer prefix (see `ascend env list`)."
        )
    return matches[0]


async def _ensure_with(
    backend: Any,
    settings: Settings,
    spec: EnvironmentSpec,
    storage: Storage,
    on_line: Callable[[str], None] | None,
) -> Environment:
    custom = getattr(backend, "ensure_environment", None)
    if custom is not None and not spec.is_host and settings.build == "cluster":
        found: Environment = await custom(settings, spec, storage, on_line or (lambda _: None))
        return found
    return await ensure(settings, spec, storage, on_line)


async def build_environment(
    settings: Settings,
    requirements: Iterable[str],
    *,
    base_image: str | None = None,
    platform: str | None = None,
    local: bool | None = None,
    resources: Any = None,
    on_line: Callable[[str], None] | None = None,
) -> Environment:
    """Build (or find) the environment for ``requirements`` (``ascend env build``): the
    same environment a call with these requirements and ``resources`` would use (the
    cluster's default index; for torch on GPU nodes, their driver's CUDA index; an image
    in registry mode).

    Args:
        platform: ``"linux/amd64"`` (default), ``"linux/arm64"``, or :data:`HOST` for
            the local backend (then it is always built here).
        local: build on this machine (``--local``) rather than as a build Job in the
            cluster; default: ``settings.build == "local"`` or the local backend.
        resources: a :class:`~ascend.Resources` whose ``gpu``/``node_type`` name the
            nodes the calls will run on (default: none, CPU nodes).
        on_line: receives each line of the build's output.

    Raises:
        ImageBuildError, StartupTimeout, ConfigError: as for a call.
    """
    from ascend._resources import Resources

    if platform is None and settings.backend == "local":
        platform = HOST
    spec = await anyio.to_thread.run_sync(
        lambda: spec_for(settings, requirements, base_image=base_image, platform=platform)
    )
    if local is not None:
        settings = dataclasses.replace(settings, build="local" if local else "cluster")
    lines = on_line or (lambda _: None)
    backend: Any = None
    if settings.backend == "kubernetes" and not spec.is_host:
        from ascend.backends import create_backend

        backend = create_backend(settings, "kubernetes")
    try:
        spec = await resolve_spec(spec, settings, resources or Resources(), backend, lines)
        async with Storage(settings.storage, settings.storage_options) as storage:
            return await _materialise(backend, settings, spec, storage, lines)
    finally:
        if backend is not None:
            await backend.aclose()


async def prune_environments(
    settings: Settings, *, older_than: float = 0.0, dry_run: bool = False
) -> list[str]:
    """Delete environments created more than ``older_than`` seconds ago, with leftover
    failure markers; returns the deleted keys. Calls starting while an environment is
    deleted rebuild it."""
    now = time.time()
    removed = []
    async with Storage(settings.storage, settings.storage_options) as storage:
        for manifest in await list_environments(settings):
            if now - float(manifest.get("created", 0)) < older_than:
                continue
            paths = EnvPaths.of(settings, manifest["key"])
            removed.append(manifest["key"])
            if not dry_run:
                await storage.delete(paths.manifest)  # first: the env no longer exists
                await storage.delete(paths.archive)
                await storage.delete(paths.failure)
    return removed


# -- the hook before submission --------------------------------------------------------


def spec_for_call(settings: Settings, resources: Any, backend: str) -> EnvironmentSpec | None:
    """The environment a call needs, or ``None`` when it runs on what is there: locally
    without requirements (this interpreter), on Kubernetes without requirements on an
    image the user chose (``image=`` or the ``image`` setting: one with the runner).

    On Kubernetes a call with neither requirements nor an image gets the runner-only
    environment on the stock base image (the runner arrives like any requirement, so a
    cluster with nothing of ascend's installed, and no published runner image, runs it).
    Requirements are never ignored: with ``image=`` (or the ``image`` setting) on
    Kubernetes they are installed on top of that image, which becomes the base.
    """
    chosen_image = resources.image or settings.image
    if not resources.requirements and (
        backend == "local" or (chosen_image and not resources.base_image)
    ):
        return None
    platform = HOST if backend == "local" else DEFAULT_PLATFORM
    base_image = resources.base_image
    if backend != "local":
        base_image = base_image or resources.image or settings.image
        from ascend_runner import _bootstrap  # read here, not on the loop later

        _source(_bootstrap)
        _source(_envbuild)
        uv_requirement()
        tool_requirement("oras")
    return spec_for(settings, resources.requirements, base_image=base_image, platform=platform)


# -- CUDA builds of torch for the target nodes' driver --------------------------------

PYTORCH_INDEX: Final = "https://download.pytorch.org/whl"
# (lowest driver major, PyTorch's CUDA index tag): the newest CUDA whose wheels a driver
# of at least that major runs, from NVIDIA's table of the minimum driver per CUDA
# toolkit release (Linux, x86_64) — 12.8 needs 570, 12.6 needs 560, ...
_CUDA_BY_DRIVER: Final = (
    (580, "cu130"),
    (575, "cu129"),
    (570, "cu128"),
    (560, "cu126"),
    (550, "cu124"),
    (530, "cu121"),
    (520, "cu118"),
)
_TORCH_PACKAGES: Final = frozenset({"torch", "torchvision", "torchaudio"})


def torch_cuda_index(driver_major: int) -> str | None:
    """The PyTorch wheel index of the newest CUDA a driver of ``driver_major`` (e.g.
    550) supports (``https://download.pytorch.org/whl/cu124``); ``None`` for a driver
    older than any CUDA build PyTorch publishes (below 520)."""
    for lowest, tag in _CUDA_BY_DRIVER:
        if driver_major >= lowest:
            return f"{PYTORCH_INDEX}/{tag}"
    return None


def wants_torch_index(spec: EnvironmentSpec) -> bool:
    """Whether a CUDA index for torch should be added to ``spec``: it names torch (or
    torchvision, torchaudio) without a local version (``+cu121`` pins a build already),
    resolves against the default index (a named index, e.g. a mirror, is the user's or
    the cluster's choice: they add a PyTorch index themselves), and names no PyTorch
    index yet."""
    named = False
    for text in spec.requirements:
        req = Requirement(text)
        if canonicalize_name(req.name) in _TORCH_PACKAGES:
            named = True
            if any("+" in str(s.version) for s in req.specifier):
                return False
    sources = (spec.index_url or "", *spec.extra_index_urls, *spec.find_links)
    return (
        named
        and spec.index_url is None
        and not any("download.pytorch.org" in source for source in sources)
    )


def with_extra_index(spec: EnvironmentSpec, url: str) -> EnvironmentSpec:
    """``spec`` with one more extra index (a different key: a different environment)."""
    return dataclasses.replace(spec, extra_index_urls=tuple(sorted({*spec.extra_index_urls, url})))


CLUSTER_DEFAULTS: Final = "ascend-defaults"
"""A ConfigMap in the namespace whose ``index_url``, ``extra_index_url`` and
``find_links`` keys are the cluster's package index for builds (an internal mirror, or
the test suite's index), used unless the user set any index."""


def _user_chose_index(spec: EnvironmentSpec, settings: Settings) -> bool:
    """Whether the settings or a requirements file named any package source."""
    return bool(
        settings.index_url
        or settings.extra_index_url
        or settings.find_links
        or spec.index_url
        or spec.extra_index_urls
        or spec.find_links
    )


def with_cluster_defaults(
    spec: EnvironmentSpec, settings: Settings, defaults: dict[str, str]
) -> EnvironmentSpec:
    """``spec`` with the cluster's index when neither the settings nor a requirements
    file named one (the key then names the cluster's index: a different environment)."""
    if not defaults or _user_chose_index(spec, settings):
        return spec
    return dataclasses.replace(
        spec,
        index_url=defaults.get("index_url") or None,
        extra_index_urls=tuple(sorted(set(_split(defaults.get("extra_index_url"))))),
        find_links=tuple(sorted(set(_split(defaults.get("find_links"))))),
    )


# A pod may start long after its call (waiting for a GPU, retried, preempted, a map's
# later items under max_parallel): its archive URL lasts as long as S3 and GCS let a
# presigned URL live (SigV4 and V4 signing: 7 days at most).
_PRESIGN_SECONDS: Final = 7 * 24 * 3600


async def fetch_url(storage: Storage, url: str) -> str:
    """What the bootstrap downloads: a local path as is, anything else presigned (so the
    base image needs no cloud SDK and the pod no credentials).

    Raises:
        StorageError: the store cannot presign URLs.
    """
    from ascend_runner._storage import local_path

    path = local_path(url)
    if path is not None:
        return path
    if url.startswith(("http://", "https://")):
        return url
    fs = await storage._filesystem()
    fs_path = storage._path(fs, url)
    try:
        if hasattr(fs, "_url"):  # s3fs, adlfs: async presigning on the store's own loop
            return str(await fs._url(fs_path, expires=_PRESIGN_SECONDS))
        signed = await anyio.to_thread.run_sync(
            functools.partial(fs.sign, fs_path, expiration=_PRESIGN_SECONDS)
        )
        return str(signed)
    except (NotImplementedError, AttributeError) as exc:
        raise StorageError(
            f"cannot presign {url} for the environment bootstrap: {exc!r}. Fix: use a "
            "storage that supports presigned URLs (S3, GCS, Azure) or a local path, or set "
            "image= to a ready-made runner image."
        ) from exc


async def prepare(job: Any, storage: Storage, backend: Any, on_line: Callable[[str], None]) -> Any:
    """The job with its environment built (or found) and its fetch URL set.

    A backend may build in its own way (Kubernetes: a build Job in the cluster) by
    offering ``ensure_environment(settings, spec, storage, on_line) -> Environment``;
    otherwise, or with ``build="local"``, the environment is built on this machine.
    """
    spec = await resolve_spec(job.environment_spec, job.settings, job.resources, backend, on_line)
    environment = await _materialise(backend, job.settings, spec, storage, on_line)
    if environment.image is not None:  # registry mode: the pod runs the image itself
        return dataclasses.replace(job, environment_spec=spec, environment=environment)
    url = await fetch_url(storage, environment.archive)
    return dataclasses.replace(
        job, environment_spec=spec, environment=environment, environment_url=url
    )


async def resolve_spec(
    spec: EnvironmentSpec,
    settings: Settings,
    resources: Any,
    backend: Any,
    on_line: Callable[[str], None],
) -> EnvironmentSpec:
    """The spec a call with ``resources`` on ``backend`` really runs: with the cluster's
    default index (when the user named none) and, for torch on GPU nodes whose GPU
    Feature Discovery labels give their driver, the CUDA index that driver runs (PyPI's
    default torch is built for the newest CUDA). Calls and ``ascend env build`` both come
    here, so an environment built ahead is the one calls use."""
    if spec.is_host:
        return spec
    defaults = getattr(backend, "cluster_defaults", None)
    if defaults is not None and not _user_chose_index(spec, settings):
        spec = with_cluster_defaults(spec, settings, await defaults(settings))
    cuda = getattr(backend, "cuda_driver_major", None)
    if cuda is not None and wants_torch_index(spec):
        major = await cuda(resources, settings)
        url = torch_cuda_index(major) if major is not None else None
        if url is not None:
            on_line(f"torch: the target nodes' driver is {major}: using {url}")
            spec = with_extra_index(spec, url)
    return spec


async def _materialise(
    backend: Any,
    settings: Settings,
    spec: EnvironmentSpec,
    storage: Storage,
    on_line: Callable[[str], None],
) -> Environment:
    """The environment of ``spec``, found or built: an image in the registry (registry
    mode), else an archive in the storage; built by a build Job in the cluster (a
    backend's ``ensure_image``/``ensure_environment``, ``build="cluster"``) or here."""
    if settings.registry and not spec.is_host:
        from ascend import _registry

        in_cluster = getattr(backend, "ensure_image", None)
        if in_cluster is not None and settings.build == "cluster":
            image: str = await in_cluster(settings, spec, storage, on_line)
            return Environment(spec, "", "", 0, image=image)
        pushed = await _registry.ensure_image(spec, settings.registry, on_line)
        return Environment(spec, "", "", 0, built=pushed.uploaded > 0, image=pushed.ref)
    return await _ensure_with(backend, settings, spec, storage, on_line)


# -- Kubernetes: the pod's command and the build Job (pure functions) ------------------

BUILD_UID: Final = 10001
BUILD_CONTAINER: Final = "runner"  # the name the backend's log follower reads
BUILD_TTL: Final = 3600
LABEL_ENV_KEY: Final = "ascend.dev/env-key"
LABEL_COMPONENT: Final = "ascend.dev/component"


def image_ref(spec: EnvironmentSpec) -> str:
    """The base image, by digest when the spec pins one."""
    return f"{spec.base_image}@{spec.base_digest}" if spec.base_digest else spec.base_image


@functools.cache
def _source(module: Any) -> str:
    return Path(module.__file__).read_text()


def bootstrap_command() -> list[str]:
    """The runner pod's command: the base image's python runs the bootstrap's source."""
    from ascend_runner import _bootstrap

    return ["python", "-u", "-c", _source(_bootstrap)]


def build_job_name(key: str) -> str:
    """One name per environment: a second create is a conflict, i.e. "already building"."""
    return f"ascend-env-{key[:40]}"


def pip_index_args(spec: EnvironmentSpec) -> list[str]:
    """pip's spelling of the spec's indexes (the build pod installs its tools with pip)."""
    args = _index_args(spec, "pip")
    # pip ignores a plain-HTTP index or link on any host but localhost unless it is
    # trusted (uv uses it as given): the user named it, so trust it the same way.
    urls = [spec.index_url or "", *spec.extra_index_urls, *spec.find_links]
    hosts = dict.fromkeys(urlsplit(u).netloc for u in urls if urlsplit(u).scheme == "http")
    for host in hosts:
        args += ["--trusted-host", host]
    return args


@functools.cache
def tool_requirement(name: str) -> str:
    """A build tool (``uv``, ``oras``) as the build pod installs it: this machine's
    version when known, so a build in the cluster behaves as one here."""
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def uv_requirement() -> str:
    """The uv the build pod installs."""
    return tool_requirement("uv")


def build_request(
    spec: EnvironmentSpec,
    *,
    runner: str,
    failure: str | None,
    archive: str | None = None,
    manifest: str | None = None,
    registry: str | None = None,
) -> dict[str, Any]:
    """What the build pod does (``ASCEND_BUILD``, see :mod:`ascend_runner._envbuild`):
    publish an archive to ``archive`` and ``manifest`` (paths or presigned URLs), or,
    with ``registry``, push an image tagged with the key. ``failure`` is where a failed
    build leaves its log (``None``: only in the pod's output)."""
    requirements, constraints = build_inputs(spec)
    tools = [uv_requirement()]
    request: dict[str, Any] = {
        "pip": pip_index_args(spec),
        "tools": tools,
        "uv": uv_options(spec),
        "requirements": requirements,
        "constraints": constraints,
        "runner": runner,
        "failure": failure,
    }
    if registry is not None:
        tools.append(tool_requirement("oras"))
        request["image"] = {
            "registry": registry,
            "key": spec.key,
            "base_image": spec.base_image,
            "base_digest": spec.base_digest,
        }
    else:
        request["archive"] = archive
        request["manifest"] = manifest
        request["manifest_body"] = {
            "key": spec.key,
            "spec": spec.to_json(),
            "builder": BUILDER_VERSION,
        }
    return request


def image_build_job_name(key: str, registry: str) -> str:
    """One name per environment image and registry (apart from the archive's build)."""
    digest = hashlib.sha256(f"{registry}#{key}".encode()).hexdigest()
    return f"ascend-img-{digest[:40]}"


REGISTRY_AUTH_DIR: Final = "/var/run/ascend/registry-auth"


def build_job_manifest(
    spec: EnvironmentSpec,
    request: dict[str, Any],
    *,
    startup_timeout: float,
    name: str | None = None,
    registry_secret: str | None = None,
) -> dict[str, Any]:
    """The ``batch/v1`` Job that builds ``spec`` in the cluster (named ``name``, default
    :func:`build_job_name`).

    It passes the ``restricted`` Pod Security profile (non-root uid 10001, no privilege
    escalation, no capabilities, ``RuntimeDefault`` seccomp, no service account token),
    runs once (``backoffLimit: 0``: a failed build is reported, not retried blindly),
    within ``startup_timeout`` (``activeDeadlineSeconds``), on the base image itself.
    ``registry_secret`` (a ``kubernetes.io/dockerconfigjson`` Secret) is mounted
    read-only as the pod's Docker config: the push credentials of an image build.
    """
    labels = {
        "app.kubernetes.io/managed-by": "ascend",
        LABEL_COMPONENT: "env-build",
        LABEL_ENV_KEY: spec.key[:63],
    }
    container: dict[str, Any] = {
        "name": BUILD_CONTAINER,
        "image": image_ref(spec),
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-u", "-c", _source(_envbuild)],
        "env": [
            {"name": "ASCEND_BUILD", "value": json.dumps(request, sort_keys=True)},
            # A non-root pod on a stock image: its only writable place is /tmp.
            {"name": "HOME", "value": "/tmp"},  # noqa: S108
            {"name": "UV_CACHE_DIR", "value": "/tmp/uv-cache"},  # noqa: S108
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "NO_COLOR", "value": "1"},
        ],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    pod_volumes: list[dict[str, Any]] = []
    if registry_secret is not None:
        pod_volumes.append(
            {
                "name": "registry-auth",
                "secret": {
                    "secretName": registry_secret,
                    "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
                },
            }
        )
        container["volumeMounts"] = [
            {"name": "registry-auth", "mountPath": REGISTRY_AUTH_DIR, "readOnly": True}
        ]
        container["env"].append({"name": "DOCKER_CONFIG", "value": REGISTRY_AUTH_DIR})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name or build_job_name(spec.key), "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": BUILD_TTL,
            "activeDeadlineSeconds": max(int(startup_timeout), 1),
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": BUILD_UID,
                        "runAsGroup": BUILD_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    **({"volumes": pod_volumes} if pod_volumes else {}),
                },
            },
        },
    }


_PRESIGN_PUT_SECONDS: Final = 6 * 3600


async def write_url(storage: Storage, url: str) -> str:
    """Where a build pod may write ``url``: a path, or a presigned S3 PUT URL.

    Raises:
        ConfigError: the store has no presigned writes ascend knows (build locally then).
    """
    from ascend_runner._storage import local_path

    path = local_path(url)
    if path is not None:
        return path
    fs = await storage._filesystem()
    if not hasattr(fs, "_call_s3"):
        raise ConfigError(
            f"an in-cluster build cannot write to {url}: ascend presigns writes on S3 and "
            "local paths only. Fix: build on this machine (build='local', `ascend env build "
            "--local`), or use S3-compatible storage."
        )
    path = storage._path(fs, url)
    signed = await fs._url(path, expires=_PRESIGN_PUT_SECONDS, client_method="put_object")
    return str(signed)


def runner_url(settings: Settings, digest: str) -> str:
    """The runner's content-addressed source archive, for build pods."""
    return f"{settings.storage.rstrip('/')}/envs/runner/{digest}.tar.gz"
