"""Registry mode: an environment as an OCI image, the base image plus deterministic layers.

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
environment's key and referenced by digest. The registry is spoken to through oras-py
(the OCI distribution API and its token auth), in worker threads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio

from ascend import _environments as envs
from ascend._errors import ConfigError, ImageBuildError
from ascend_runner import _envbuild

ENV_ROOT: Final = "opt/ascend/env"
HEAVY: Final = re.compile(
    r"^(torch|torchvision|torchaudio|triton|nvidia-.+|jax|jaxlib|tensorflow.*|xformers|"
    r"flash-attn|cupy.*|onnxruntime.*|vllm)$"
)
HEAVY_BYTES: Final = 64 << 20
_CHUNKED_ABOVE: Final = 64 << 20
_CHUNK: Final = 16 << 20
LAYER_MEDIA_TYPE: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE: Final = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE: Final = "application/vnd.oci.image.manifest.v1+json"
_INDEX_TYPES: Final = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_ACCEPT: Final = [
    MANIFEST_MEDIA_TYPE,
    "application/vnd.docker.distribution.manifest.v2+json",
    *_INDEX_TYPES,
]


@dataclass(frozen=True)
class Layer:
    """Files of the environment that travel together (relative POSIX paths)."""

    name: str
    entries: tuple[str, ...]


def _distribution_files(folder: Path) -> dict[str, set[str]]:
    """Each installed distribution's files, from its ``RECORD`` (canonical names)."""
    from packaging.utils import canonicalize_name

    out: dict[str, set[str]] = {}
    for record in sorted(folder.glob("*.dist-info/RECORD")):
        # "{name}-{version}.dist-info": names never hold "-" here (they are escaped).
        name = str(canonicalize_name(record.parent.name.removesuffix(".dist-info").split("-")[0]))
        files = out.setdefault(name, set())
        for line in record.read_text().splitlines():
            path = line.rsplit(",", 2)[0].strip('"')
            if path and not path.startswith(".."):
                files.add(path)
        files.update(
            p.relative_to(folder).as_posix() for p in record.parent.rglob("*") if p.is_file()
        )
    return out


def split_layers(folder: Path, *, heavy_bytes: int = HEAVY_BYTES) -> list[Layer]:
    """The environment in ``folder`` as layers (see the module docstring). Each entry is
    in exactly one layer; a folder goes with the first layer that has a file in it."""
    entries = _envbuild.sorted_entries(folder)
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
            who = owner.get(path)
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


# -- talking to the registry (oras-py, in threads) -------------------------------------


@dataclass(frozen=True)
class Target:
    """Where environments are pushed: ``host[:port]/repository`` (``http://`` prefix for
    a registry without TLS)."""

    host: str
    repository: str
    insecure: bool

    @classmethod
    def parse(cls, value: str) -> Target:
        insecure = value.startswith("http://")
        rest = value.split("://", 1)[1] if "://" in value else value
        host, _, repository = rest.partition("/")
        if not host or not repository:
            raise ConfigError(
                f"registry {value!r} must be 'host[:port]/repository' (prefix 'http://' for "
                "a registry without TLS), e.g. 'ghcr.io/my-org/ascend-envs'."
            )
        return cls(host, repository.rstrip("/"), insecure)

    def ref(self, tag_or_digest: str) -> str:
        sep = "@" if tag_or_digest.startswith("sha256:") else ":"
        return f"{self.host}/{self.repository}{sep}{tag_or_digest}"


def _client(target: Target) -> Any:
    try:
        import oras.provider
    except ImportError as exc:
        raise ConfigError(
            f"registry mode needs oras-py: {exc}. Fix: pip install 'ascend-k8s[registry]'."
        ) from exc
    return oras.provider.Registry(hostname=target.host, insecure=target.insecure)


class _Session:
    """Blocking registry calls for one push, run in a worker thread."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.registry = _client(target)
        self.uploads = 0
        self.uploaded_bytes = 0

    def _container(self, repository: str, ref: str = "latest") -> Any:
        sep = "@" if ref.startswith("sha256:") else ":"
        return self.registry.get_container(f"{self.target.host}/{repository}{sep}{ref}")

    def _url(self, path: str) -> str:
        return f"{self.registry.prefix}://{self.target.host}/v2/{path}"

    def manifest_digest(self, repository: str, ref: str) -> str | None:
        """The digest ``ref`` names in ``repository``, or ``None`` when it does not exist."""
        response = self.registry.do_request(
            self._url(f"{repository}/manifests/{ref}"),
            "HEAD",
            headers={"Accept": ", ".join(_ACCEPT)},
        )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ImageBuildError(
                f"registry {self.target.host}: HEAD {repository}:{ref} answered "
                f"{response.status_code}. Fix: check the registry setting and credentials."
            )
        return str(response.headers["Docker-Content-Digest"])

    def manifest(self, repository: str, ref: str) -> dict[str, Any]:
        """The image manifest for linux/amd64 (an index is resolved to it)."""
        manifest: dict[str, Any] = self.registry.get_manifest(
            self._container(repository, ref), allowed_media_type=_ACCEPT
        )
        if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
            for entry in manifest["manifests"]:
                platform = entry.get("platform", {})
                if (platform.get("os"), platform.get("architecture")) == ("linux", "amd64"):
                    return self.manifest(repository, entry["digest"])
            raise ImageBuildError(f"{repository}:{ref} has no linux/amd64 image.")
        return manifest

    def blob(self, repository: str, digest: str) -> bytes:
        response = self.registry.get_blob(self._container(repository), digest)
        response.raise_for_status()
        return bytes(response.content)

    def exists(self, digest: str) -> bool:
        layer = {"digest": digest}
        return bool(self.registry.blob_exists(layer, self._container(self.target.repository)))

    def mount(self, digest: str, source: str) -> bool:
        """Cross-repository mount of a base layer (same registry): no bytes move."""
        response = self.registry.do_request(
            self._url(f"{self.target.repository}/blobs/uploads/?mount={digest}&from={source}"),
            "POST",
        )
        return bool(response.status_code == 201)

    def upload(self, path: Path, digest: str, media_type: str) -> None:
        """Upload a blob from its file unless the repository has it; large blobs in
        chunks (oras-py reads a monolithic upload into memory)."""
        if self.exists(digest):
            return
        size = path.stat().st_size
        layer = {"mediaType": media_type, "digest": digest, "size": size}
        response = self.registry.upload_blob(
            str(path),
            self._container(self.target.repository),
            layer,
            do_chunked=size > _CHUNKED_ABOVE,
            chunk_size=_CHUNK,
        )
        if response.status_code not in (200, 201, 202):
            raise ImageBuildError(
                f"registry {self.target.host}: uploading {digest} answered "
                f"{response.status_code}: {response.text[:300]}"
            )
        self.uploads += 1
        self.uploaded_bytes += size

    def put_manifest(self, manifest: dict[str, Any], tag: str) -> str:
        body = canonical_json(manifest)
        response = self.registry.do_request(
            self._url(f"{self.target.repository}/manifests/{tag}"),
            "PUT",
            headers={"Content-Type": MANIFEST_MEDIA_TYPE},
            data=body,
        )
        if response.status_code not in (200, 201):
            raise ImageBuildError(
                f"registry {self.target.host}: pushing the manifest answered "
                f"{response.status_code}: {response.text[:300]}"
            )
        return f"sha256:{hashlib.sha256(body).hexdigest()}"


def _base_location(spec: envs.EnvironmentSpec, target: Target) -> tuple[str, str]:
    """The base image's repository (in the target registry) and its tag or digest."""
    name = spec.base_image
    host, _, rest = name.partition("/")
    if rest and ("." in host or ":" in host or host == "localhost"):
        if host != target.host:
            raise ConfigError(
                f"base_image {name!r} is in another registry than {target.host}: registry "
                "mode mounts base layers within one registry. Fix: mirror the base image "
                f"into {target.host} (e.g. with skopeo or crane) and name it there."
            )
        name = rest
    elif "/" not in name:
        name = f"library/{name}"  # as a docker.io mirror stores official images
    repository, _, tag = name.partition(":")
    return repository, spec.base_digest or tag or "latest"


@dataclass(frozen=True)
class PushedImage:
    ref: str
    """``host/repository@sha256:...``"""
    layers: tuple[str, ...]
    """Our layers' digests, in order (heavy layers, deps, runner)."""
    uploaded: int
    """Blobs actually uploaded (0 when the image existed)."""
    uploaded_bytes: int = 0
    layer_bytes: tuple[int, ...] = ()
    """Our layers' compressed sizes, in the order of ``layers``."""


async def ensure_image(
    spec: envs.EnvironmentSpec,
    registry: str,
    on_line: Callable[[str], None] | None = None,
) -> PushedImage:
    """The environment of ``spec`` as an image in ``registry``: found by its tag (the
    key), or installed here with uv, layered and pushed.

    Raises:
        ImageBuildError: the install or the push failed.
        ConfigError: the registry setting or the base image cannot be used.
    """
    target = Target.parse(registry)
    flight_key = f"{registry}#{spec.key}"
    while flight_key in _inflight:  # one push per image in this process
        await _inflight[flight_key].wait()
    done = _inflight[flight_key] = anyio.Event()
    try:
        return await _ensure_image(target, spec, on_line)
    finally:
        del _inflight[flight_key]
        done.set()


_inflight: dict[str, anyio.Event] = {}


async def _ensure_image(
    target: Target, spec: envs.EnvironmentSpec, on_line: Callable[[str], None] | None
) -> PushedImage:
    session = await anyio.to_thread.run_sync(_Session, target)
    existing = await anyio.to_thread.run_sync(session.manifest_digest, target.repository, spec.key)
    if existing is not None:
        manifest = await anyio.to_thread.run_sync(session.manifest, target.repository, existing)
        ours = tuple(
            layer["digest"]
            for layer in manifest["layers"]
            if (layer.get("annotations") or {})
            .get("org.opencontainers.image.title", "")
            .startswith("ascend-")
        )
        return PushedImage(target.ref(existing), ours, 0)
    base_repo, base_ref = _base_location(spec, target)
    base = await anyio.to_thread.run_sync(session.manifest, base_repo, base_ref)
    base_config = json.loads(
        await anyio.to_thread.run_sync(session.blob, base_repo, base["config"]["digest"])
    )
    async with envs.installed(spec, on_line) as folder:
        layers = await anyio.to_thread.run_sync(split_layers, folder)
        blobs = [
            await anyio.to_thread.run_sync(
                layer_blob, folder, layer, folder.parent / f"layer-{i}.tar.gz"
            )
            for i, layer in enumerate(layers)
        ]
        config = canonical_json(image_config(base_config, blobs, spec.key))
        manifest = image_manifest(base["layers"], config, blobs, spec.key)
        config_file = folder.parent / "config.json"
        await anyio.Path(config_file).write_bytes(config)
        digest = await anyio.to_thread.run_sync(
            _push, session, target, base, base_repo, blobs, config_file, manifest, spec.key, on_line
        )
    return PushedImage(
        target.ref(digest),
        tuple(b.digest for b in blobs),
        session.uploads,
        session.uploaded_bytes,
        tuple(b.size for b in blobs),
    )


def _push(
    session: _Session,
    target: Target,
    base: dict[str, Any],
    base_repo: str,
    blobs: list[Blob],
    config_file: Path,
    manifest: dict[str, Any],
    tag: str,
    on_line: Callable[[str], None] | None,
) -> str:
    """Base layers mounted, our layers and the config uploaded, the manifest tagged."""
    for layer in base["layers"]:
        if not session.exists(layer["digest"]) and not session.mount(layer["digest"], base_repo):
            raise ImageBuildError(
                f"registry {target.host}: cannot mount base layer {layer['digest']} "
                f"from {base_repo}."
            )
    for blob in blobs:
        if on_line is not None:
            on_line(f"pushing layer {blob.name} ({blob.size} bytes)")
        session.upload(blob.path, blob.digest, LAYER_MEDIA_TYPE)
    session.upload(config_file, manifest["config"]["digest"], CONFIG_MEDIA_TYPE)
    return session.put_manifest(manifest, tag)
