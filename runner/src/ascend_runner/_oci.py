"""Environments as OCI images: layering an installed environment and pushing it.

Used by the client (``registry=`` with ``build="local"``) and by the build pod
(``build="cluster"``), which runs this module from the runner archive beside a
pip-installed oras-py. Standard library only at import; the registry is spoken to
through oras-py (the OCI distribution API with its Basic and Bearer-token flows).

The installed environment (``uv pip install --target``, the runner included) is split
into layers by distribution, each a deterministic tar under ``/opt/ascend/env``:

1. one layer per *heavy* distribution (``torch``, ``nvidia-*``, ``triton``, ``jax``,
   ... or any distribution of :data:`HEAVY_BYTES` or more), sorted by name;
2. one layer for every other distribution (and files no distribution claims);
3. one layer for the runner.

So changing a small requirement changes the digest of layer 2 only: a push uploads
that one small layer, and nodes that pulled the image before pull only it again. The
image config adds ``PYTHONPATH=/opt/ascend/env``, so the pod runs
``python -m ascend_runner`` with no bootstrap. The image is tagged with the
environment's key and referenced by digest.

Credentials come from the Docker config file (``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``): ``docker login``'s file on a laptop, a mounted
``kubernetes.io/dockerconfigjson`` Secret in a build pod.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ascend_runner import _envbuild

ENV_ROOT: Final = "opt/ascend/env"
HEAVY: Final = re.compile(
    r"^(torch|torchvision|torchaudio|triton|nvidia-.+|jax|jaxlib|tensorflow.*|xformers|"
    r"flash-attn|cupy.*|onnxruntime.*|vllm)$"
)
HEAVY_BYTES: Final = 64 << 20
_CHUNKED_ABOVE: Final = 64 << 20
_CHUNK: Final = 16 << 20
_ATTEMPTS: Final = 3
LAYER_MEDIA_TYPE: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE: Final = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE: Final = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPES: Final = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_ACCEPT: Final = [
    MANIFEST_MEDIA_TYPE,
    "application/vnd.docker.distribution.manifest.v2+json",
    *INDEX_TYPES,
]


# The OCI distribution spec's repository name.
_REPOSITORY: Final = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)


class RegistryError(RuntimeError):
    """The registry refused or failed a request (the message names it and the fix)."""


class RegistrySettingError(ValueError):
    """A registry or base image setting that cannot be used (the message says why)."""


def canonical_name(name: str) -> str:
    """A distribution's canonical name (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Layer:
    """Files of the environment that travel together (relative POSIX paths)."""

    name: str
    entries: tuple[str, ...]


def _distribution_files(folder: Path) -> dict[str, set[str]]:
    """Each installed distribution's files, from its ``RECORD`` (canonical names)."""
    out: dict[str, set[str]] = {}
    for record in sorted(folder.glob("*.dist-info/RECORD")):
        # "{name}-{version}.dist-info": names never hold "-" here (they are escaped).
        name = canonical_name(record.parent.name.removesuffix(".dist-info").split("-")[0])
        files = out.setdefault(name, set())
        for line in record.read_text().splitlines():
            path = line.rsplit(",", 2)[0].strip('"')
            if path and not path.startswith(".."):
                files.add(path)
        files.update(
            p.relative_to(folder).as_posix() for p in record.parent.rglob("*") if p.is_file()
        )
    return out


def _source_of(path: str) -> str:
    """A compiled module's source (``pkg/__pycache__/m.cpython-311.pyc`` ->
    ``pkg/m.py``), so its bytecode travels in its distribution's layer; else ``path``."""
    if path.startswith("__pycache__/"):
        folder, name = "", path.removeprefix("__pycache__/")
    else:
        folder, _, name = path.rpartition("/__pycache__/")
    if not name.endswith(".pyc"):
        return path
    module = name.split(".", 1)[0]
    return f"{folder}/{module}.py" if folder else f"{module}.py"


def split_layers(folder: Path, *, heavy_bytes: int = HEAVY_BYTES) -> list[Layer]:
    """The environment in ``folder`` as layers (see the module docstring). Each entry is
    in exactly one layer; a folder goes with the first layer that has a file in it."""
    entries = _envbuild.sorted_entries(folder, bytecode=True)
    files = {e for e in entries if not (folder / e).is_dir() or (folder / e).is_symlink()}
    owner: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for dist, paths in _distribution_files(folder).items():
        for path in paths:
            if path in files:
                owner.setdefault(path, dist)
                sizes[dist] = sizes.get(dist, 0) + (folder / path).stat().st_size
    groups: dict[str, list[str]] = {}
    for path in sorted(files):
        if path.startswith("ascend_runner/"):
            group = "~runner"
        else:
            who = owner.get(_source_of(path))
            heavy = who is not None and (HEAVY.match(who) or sizes[who] >= heavy_bytes)
            group = who if heavy and who else "~deps"
        groups.setdefault(group, []).append(path)
    layers = []
    placed: set[str] = set()
    for group in sorted(groups):  # heavy names first, then ~deps, then ~runner
        members = set(groups[group])
        for path in list(members):  # parent folders, so every layer unpacks alone
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                parent = "/".join(parts[:depth])
                if parent not in placed:
                    members.add(parent)
        placed |= members
        layers.append(Layer(group.lstrip("~"), tuple(sorted(members))))
    return layers


@dataclass(frozen=True)
class Blob:
    """A layer as pushed: its ``tar+gzip`` file, digest, size and uncompressed ``diff_id``."""

    name: str
    path: Path
    digest: str
    diff_id: str
    size: int

    @property
    def descriptor(self) -> dict[str, Any]:
        return {
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": self.digest,
            "size": self.size,
            "annotations": {"org.opencontainers.image.title": f"ascend-{self.name}"},
        }


def layer_blob(folder: Path, layer: Layer, dest: Path) -> Blob:
    """The layer's deterministic ``tar+gzip`` under ``/opt/ascend/env``, streamed to
    ``dest`` (a layer may be gigabytes: it never sits in memory)."""
    with dest.open("wb") as out:
        digest, diff_id, size = _envbuild.pack(folder, list(layer.entries), out, ENV_ROOT)
    return Blob(layer.name, dest, f"sha256:{digest}", f"sha256:{diff_id}", size)


def image_config(base: dict[str, Any], blobs: list[Blob], key: str) -> dict[str, Any]:
    """The base image's config with our layers' ``diff_ids`` appended, ``PYTHONPATH`` set
    and no history timestamps of ours (the config is deterministic)."""
    config = copy.deepcopy(base)
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    config["rootfs"]["diff_ids"] = [*config["rootfs"].get("diff_ids", [])] + [
        b.diff_id for b in blobs
    ]
    inner = config.setdefault("config", {})
    env = [e for e in inner.get("Env") or [] if not e.startswith("PYTHONPATH=")]
    inner["Env"] = [*env, f"PYTHONPATH=/{ENV_ROOT}", "PYTHONUNBUFFERED=1"]
    inner.setdefault("Labels", {})
    inner["Labels"] = {**(inner["Labels"] or {}), "dev.ascend.env-key": key}
    config["history"] = [*config.get("history", [])] + [
        {"created_by": f"ascend environment layer {b.name}", "comment": "ascend"} for b in blobs
    ]
    return config


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def image_manifest(
    base_layers: list[dict[str, Any]], config: bytes, blobs: list[Blob], key: str
) -> dict[str, Any]:
    """An OCI image manifest: the base image's layers, then ours."""
    return {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": f"sha256:{hashlib.sha256(config).hexdigest()}",
            "size": len(config),
        },
        "layers": [*base_layers, *(b.descriptor for b in blobs)],
        "annotations": {"dev.ascend.env-key": key},
    }


# -- talking to the registry (oras-py; blocking) ---------------------------------------


@dataclass(frozen=True)
class Target:
    """Where environments are pushed: ``host[:port]/repository`` (``http://`` prefix for
    a registry without TLS)."""

    host: str
    repository: str
    insecure: bool

    @classmethod
    def parse(cls, value: str) -> Target:
        """Raises:
        RegistrySettingError: not ``[http://]host[:port]/repository``."""
        insecure = value.startswith("http://")
        scheme_ok = "://" not in value or value.startswith(("http://", "https://"))
        rest = value.split("://", 1)[1] if "://" in value else value
        host, _, repository = rest.partition("/")
        if not scheme_ok or not host or not repository:
            raise RegistrySettingError(
                f"registry {value!r} must be 'host[:port]/repository' (prefix 'http://' for "
                "a registry without TLS), e.g. 'ghcr.io/my-org/ascend-envs'."
            )
        repository = repository.rstrip("/")
        if not _REPOSITORY.fullmatch(repository):
            raise RegistrySettingError(
                f"registry {value!r}: {repository!r} is not an OCI repository name. Fix: use "
                "lowercase letters, digits and '.', '_', '-' between them, and '/' between "
                "path parts, e.g. 'my-org/ascend-envs'."
            )
        return cls(host, repository, insecure)

    def ref(self, tag_or_digest: str) -> str:
        sep = "@" if tag_or_digest.startswith("sha256:") else ":"
        return f"{self.host}/{self.repository}{sep}{tag_or_digest}"


def docker_configs() -> list[str]:
    """The Docker config files credentials come from: ``$DOCKER_CONFIG/config.json``
    when set (oras-py adds ``~/.docker/config.json`` itself)."""
    folder = os.environ.get("DOCKER_CONFIG")
    return [os.path.join(folder, "config.json")] if folder else []


def auth_scheme(challenge: str) -> str:
    """oras-py's auth backend for a ``WWW-Authenticate`` challenge: ``"basic"`` for a
    Basic realm (htpasswd registries), else ``"token"`` (Bearer, the common case)."""
    return "basic" if challenge.strip().lower().startswith("basic") else "token"


def _challenge(target: Target) -> str:
    """The registry's ``WWW-Authenticate`` answer to an anonymous ``GET /v2/`` (empty
    when it lets anyone in).

    Raises:
        RegistryError: the registry cannot be reached.
    """
    import urllib.error
    import urllib.request

    scheme = "http" if target.insecure else "https"
    try:
        with urllib.request.urlopen(f"{scheme}://{target.host}/v2/", timeout=30):  # noqa: S310
            return ""
    except urllib.error.HTTPError as exc:
        return str(exc.headers.get("WWW-Authenticate", ""))
    except OSError as exc:
        raise RegistryError(
            f"registry {target.host} cannot be reached: {exc}. Fix: check the registry "
            "setting (prefix 'http://' for a registry without TLS) and the network."
        ) from exc


def _registry(target: Target) -> Any:
    try:
        import oras.provider
    except ImportError as exc:
        raise RegistrySettingError(
            f"registry mode needs oras-py: {exc}. Fix: pip install 'ascend-k8s[registry]'."
        ) from exc
    backend = auth_scheme(_challenge(target))
    registry = oras.provider.Registry(
        hostname=target.host, insecure=target.insecure, auth_backend=backend
    )
    container = registry.get_container(f"{target.host}/{target.repository}")
    registry.auth.load_configs(container, configs=docker_configs())
    return registry


class Session:
    """Blocking registry calls for one push (run them in a worker thread from async code).

    Raises:
        RegistrySettingError: oras-py is missing.
        RegistryError: the registry cannot be reached.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.registry = _registry(target)
        self.uploads = 0
        self.uploaded_bytes = 0

    def _container(self, repository: str, ref: str = "latest") -> Any:
        sep = "@" if ref.startswith("sha256:") else ":"
        return self.registry.get_container(f"{self.target.host}/{repository}{sep}{ref}")

    def _url(self, path: str) -> str:
        return f"{self.registry.prefix}://{self.target.host}/v2/{path}"

    def _request(self, url: str, method: str, what: str, **kwargs: Any) -> Any:
        """One request with oras-py's auth flow, retried twice on a connection error or
        a 5xx answer. Not through oras-py's own retry, which retries a refusal of
        credentials too, for over two minutes."""
        request = getattr(type(self.registry).do_request, "__wrapped__", None)
        for attempt in range(_ATTEMPTS):
            try:
                if request is None:  # pragma: no cover - an oras-py without the decorator
                    response = self.registry.do_request(url, method, **kwargs)
                else:
                    response = request(self.registry, url, method, **kwargs)
            except AttributeError as exc:  # oras-py's Basic backend without credentials
                raise RegistryError(self._denied(what, None)) from exc
            except ValueError as exc:  # oras-py: "Cannot respond to request for authentication."
                raise RegistryError(self._denied(what, f"no credentials accepted: {exc}")) from exc
            except OSError as exc:  # requests' connection errors
                if attempt == _ATTEMPTS - 1:
                    raise RegistryError(
                        f"registry {self.target.host}: {what} failed: {exc}. Fix: check that "
                        "the registry is reachable from here."
                    ) from exc
            else:
                if response.status_code < 500 or attempt == _ATTEMPTS - 1:
                    return response
            time.sleep(1 + attempt)
        raise AssertionError("unreachable")

    def _denied(self, what: str, answer: str | None) -> str:
        """``answer`` ``None``: no credentials for this registry were found at all."""
        where = " or ".join([*docker_configs(), "~/.docker/config.json"])
        said = (
            f"asks for credentials, and {where} holds none for {self.target.host}"
            if answer is None
            else f"was refused ({answer})"
        )
        return (
            f"registry {self.target.host}: {what} {said}. Fix: log in (`docker login "
            f"{self.target.host}` writes ~/.docker/config.json; DOCKER_CONFIG names the "
            "folder of another config.json; a build pod reads the Secret named by "
            f"registry_secret), and check that the account may push to {self.target.repository}."
        )

    def _check(self, response: Any, what: str, ok: tuple[int, ...]) -> None:
        if response.status_code in ok:
            return
        if response.status_code in (401, 403):
            raise RegistryError(self._denied(what, f"HTTP {response.status_code}"))
        raise RegistryError(
            f"registry {self.target.host}: {what} answered {response.status_code}: "
            f"{response.text[:300]}"
        )

    def manifest_digest(self, repository: str, ref: str) -> str | None:
        """The digest ``ref`` names in ``repository``, or ``None`` when it does not exist."""
        response = self._request(
            self._url(f"{repository}/manifests/{ref}"),
            "HEAD",
            f"HEAD {repository}:{ref}",
            headers={"Accept": ", ".join(_ACCEPT)},
        )
        if response.status_code == 404:
            return None
        self._check(response, f"HEAD {repository}:{ref}", (200,))
        return str(response.headers["Docker-Content-Digest"])

    def manifest(self, repository: str, ref: str) -> dict[str, Any]:
        """The image manifest for linux/amd64 (an index is resolved to it)."""
        what = f"GET manifest {repository}:{ref}"
        response = self._request(
            self._url(f"{repository}/manifests/{ref}"),
            "GET",
            what,
            headers={"Accept": ", ".join(_ACCEPT)},
        )
        self._check(response, what, (200,))
        manifest: dict[str, Any] = response.json()
        if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            for entry in manifest["manifests"]:
                platform = entry.get("platform", {})
                if (platform.get("os"), platform.get("architecture")) == ("linux", "amd64"):
                    return self.manifest(repository, entry["digest"])
            raise RegistryError(f"{repository}:{ref} has no linux/amd64 image.")
        return manifest

    def blob(self, repository: str, digest: str) -> bytes:
        what = f"GET blob {repository}@{digest}"
        response = self._request(self._url(f"{repository}/blobs/{digest}"), "GET", what)
        self._check(response, what, (200,))
        return bytes(response.content)

    def exists(self, digest: str) -> bool:
        what = f"HEAD blob {digest}"
        response = self._request(
            self._url(f"{self.target.repository}/blobs/{digest}"), "HEAD", what
        )
        if response.status_code == 404:
            return False
        self._check(response, what, (200,))
        return True

    def mount(self, digest: str, source: str) -> bool:
        """Cross-repository mount of a base layer (same registry): no bytes move."""
        response = self._request(
            self._url(f"{self.target.repository}/blobs/uploads/?mount={digest}&from={source}"),
            "POST",
            f"mounting {digest} from {source}",
        )
        if response.status_code in (401, 403):
            self._check(response, f"mounting {digest} from {source}", (201,))
        return bool(response.status_code == 201)

    def upload(self, path: Path, digest: str, media_type: str) -> None:
        """Upload a blob from its file unless the repository has it; large blobs in
        chunks (oras-py reads a monolithic upload into memory)."""
        if self.exists(digest):
            return
        size = path.stat().st_size
        layer = {"mediaType": media_type, "digest": digest, "size": size}
        try:
            response = self.registry.upload_blob(
                str(path),
                self._container(self.target.repository),
                layer,
                do_chunked=size > _CHUNKED_ABOVE,
                chunk_size=_CHUNK,
            )
        except (ValueError, AttributeError) as exc:
            raise RegistryError(self._denied(f"uploading {digest}", f"{exc}")) from exc
        self._check(response, f"uploading {digest}", (200, 201, 202))
        self.uploads += 1
        self.uploaded_bytes += size

    def put_manifest(self, manifest: dict[str, Any], tag: str) -> str:
        body = canonical_json(manifest)
        what = f"pushing the manifest {self.target.repository}:{tag}"
        response = self._request(
            self._url(f"{self.target.repository}/manifests/{tag}"),
            "PUT",
            what,
            headers={"Content-Type": MANIFEST_MEDIA_TYPE},
            data=body,
        )
        self._check(response, what, (200, 201))
        return f"sha256:{hashlib.sha256(body).hexdigest()}"


def base_location(base_image: str, base_digest: str | None, target: Target) -> tuple[str, str]:
    """The base image's repository (in the target registry) and its tag or digest.

    Raises:
        RegistrySettingError: the base image is in another registry.
    """
    name = base_image
    host, _, rest = name.partition("/")
    if rest and ("." in host or ":" in host or host == "localhost"):
        if host != target.host:
            raise RegistrySettingError(
                f"base_image {name!r} is in another registry than {target.host}: registry "
                "mode mounts base layers within one registry. Fix: mirror the base image "
                f"into {target.host} (e.g. with skopeo or crane) and name it there."
            )
        name = rest
    elif "/" not in name:
        name = f"library/{name}"  # as a docker.io mirror stores official images
    repository, _, tag = name.partition(":")
    return repository, base_digest or tag or "latest"


def base_manifest(session: Session, base_image: str, base_digest: str | None) -> dict[str, Any]:
    """The base image's manifest in the target registry.

    Raises:
        RegistrySettingError: the registry does not hold the base image (with the fix).
        RegistryError: the registry refused.
    """
    target = session.target
    repository, ref = base_location(base_image, base_digest, target)
    if session.manifest_digest(repository, ref) is None:
        sep = "@" if ref.startswith("sha256:") else ":"
        raise RegistrySettingError(
            f"the base image {base_image!r} is not in {target.host} as {repository}{sep}{ref}: "
            "registry mode builds on base layers in the same registry. Fix: mirror it "
            f"there (e.g. `skopeo copy docker://docker.io/{repository}{sep}{ref} "
            f"docker://{target.host}/{repository}{sep}{ref}`), or set base_image to an "
            "image the registry holds."
        )
    return session.manifest(repository, ref)


@dataclass(frozen=True)
class Pushed:
    """An environment image in the registry."""

    ref: str
    """``host/repository@sha256:...``"""
    layers: tuple[str, ...]
    """Our layers' digests, in order (heavy layers, deps, runner)."""
    uploaded: int
    """Blobs actually uploaded (0 when the image existed)."""
    uploaded_bytes: int = 0
    layer_bytes: tuple[int, ...] = ()
    """Our layers' compressed sizes, in the order of ``layers``."""


def find(session: Session, key: str) -> Pushed | None:
    """The image tagged ``key`` in the target repository, or ``None``."""
    target = session.target
    existing = session.manifest_digest(target.repository, key)
    if existing is None:
        return None
    manifest = session.manifest(target.repository, existing)
    ours = tuple(
        layer["digest"]
        for layer in manifest["layers"]
        if (layer.get("annotations") or {})
        .get("org.opencontainers.image.title", "")
        .startswith("ascend-")
    )
    return Pushed(target.ref(existing), ours, 0)


def push_environment(
    session: Session,
    folder: Path,
    work: Path,
    *,
    base_image: str,
    base_digest: str | None,
    key: str,
    on_line: Callable[[str], None] | None = None,
) -> Pushed:
    """The installed environment in ``folder`` as an image on ``base_image``, tagged
    ``key``: base layers mounted, our layers (files in ``work``) and config uploaded.

    Raises:
        RegistryError, RegistrySettingError: as the registry answered, or the base image
        is elsewhere.
    """
    target = session.target
    base_repo, _ = base_location(base_image, base_digest, target)
    base = base_manifest(session, base_image, base_digest)
    base_config = json.loads(session.blob(base_repo, base["config"]["digest"]))
    blobs = [
        layer_blob(folder, layer, work / f"layer-{i}.tar.gz")
        for i, layer in enumerate(split_layers(folder))
    ]
    config = canonical_json(image_config(base_config, blobs, key))
    manifest = image_manifest(base["layers"], config, blobs, key)
    config_file = work / "config.json"
    config_file.write_bytes(config)
    for layer in base["layers"]:
        if not session.exists(layer["digest"]) and not session.mount(layer["digest"], base_repo):
            raise RegistryError(
                f"registry {target.host}: cannot mount base layer {layer['digest']} "
                f"from {base_repo}."
            )
    for blob in blobs:
        if on_line is not None:
            on_line(f"pushing layer {blob.name} ({blob.size} bytes)")
        session.upload(blob.path, blob.digest, LAYER_MEDIA_TYPE)
    session.upload(config_file, manifest["config"]["digest"], CONFIG_MEDIA_TYPE)
    digest = session.put_manifest(manifest, key)
    return Pushed(
        target.ref(digest),
        tuple(b.digest for b in blobs),
        session.uploads,
        session.uploaded_bytes,
        tuple(b.size for b in blobs),
    )
