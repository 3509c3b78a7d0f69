"""Registry mode: an environment as an OCI image, the base image plus deterministic layers.

The layering and the registry calls live in :mod:`ascend_runner._oci`, shared with the
in-cluster build pod (``build="cluster"``, the default: see
:mod:`ascend.backends._kubernetes._envbuild`). This module finds an environment's image
by its tag (the key) and, with ``build="local"``, installs the environment here with uv,
layers it and pushes it, all in worker threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import anyio

from ascend import _environments as envs
from ascend._errors import ConfigError, ImageBuildError
from ascend_runner import _oci
from ascend_runner._oci import (
    CONFIG_MEDIA_TYPE,
    LAYER_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    Blob,
    Layer,
    Target,
    canonical_json,
    image_config,
    image_manifest,
    layer_blob,
    split_layers,
)

__all__ = [
    "CONFIG_MEDIA_TYPE",
    "LAYER_MEDIA_TYPE",
    "MANIFEST_MEDIA_TYPE",
    "Blob",
    "Layer",
    "PushedImage",
    "Target",
    "canonical_json",
    "ensure_image",
    "find_image",
    "image_config",
    "image_manifest",
    "layer_blob",
    "parse_target",
    "split_layers",
]

PushedImage = _oci.Pushed


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """The shared module's errors as ascend's: a registry's refusal is an
    :class:`ImageBuildError`, an unusable setting a :class:`ConfigError`."""
    try:
        yield
    except _oci.RegistrySettingError as exc:
        raise ConfigError(str(exc)) from exc
    except _oci.RegistryError as exc:
        raise ImageBuildError(str(exc)) from exc


def parse_target(registry: str) -> Target:
    """The ``registry`` setting as a :class:`Target`.

    Raises:
        ConfigError: not ``[http://]host[:port]/repository``.
    """
    with _errors():
        return Target.parse(registry)


def _session(target: Target) -> _oci.Session:
    with _errors():
        return _oci.Session(target)


def lookup(session: _oci.Session, repository: str, ref: str) -> str | None:
    """The digest ``ref`` names in ``repository`` (``None``: none), blocking.

    Raises:
        ImageBuildError: the registry refused the lookup.
    """
    with _errors():
        return session.manifest_digest(repository, ref)


def _base_location(spec: envs.EnvironmentSpec, target: Target) -> tuple[str, str]:
    with _errors():
        return _oci.base_location(spec.base_image, spec.base_digest, target)


async def find_image(spec: envs.EnvironmentSpec, registry: str) -> PushedImage | None:
    """The environment's image in ``registry`` (tagged with its key), or ``None``.

    Raises:
        ImageBuildError: the registry refused the lookup (credentials).
        ConfigError: the registry setting cannot be used, or oras-py is missing.
    """
    target = parse_target(registry)
    session = await anyio.to_thread.run_sync(_session, target)

    def find() -> PushedImage | None:
        with _errors():
            return _oci.find(session, spec.key)

    return await anyio.to_thread.run_sync(find)


async def check_base(spec: envs.EnvironmentSpec, registry: str) -> None:
    """Fail before any build when ``registry`` does not hold the base image.

    Raises:
        ConfigError: it does not (with the way to mirror it).
        ImageBuildError: the registry refused the lookup.
    """
    target = parse_target(registry)
    session = await anyio.to_thread.run_sync(_session, target)

    def check() -> None:
        with _errors():
            _oci.base_manifest(session, spec.base_image, spec.base_digest)

    await anyio.to_thread.run_sync(check)


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
    target = parse_target(registry)
    _base_location(spec, target)  # a base image elsewhere is refused before any work
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
    session = await anyio.to_thread.run_sync(_session, target)

    def find() -> PushedImage | None:
        with _errors():
            return _oci.find(session, spec.key)

    existing = await anyio.to_thread.run_sync(find)
    if existing is not None:
        return existing

    def check_base() -> None:  # before the install, which may take minutes
        with _errors():
            _oci.base_manifest(session, spec.base_image, spec.base_digest)

    await anyio.to_thread.run_sync(check_base)
    async with envs.installed(spec, on_line) as folder:

        def push() -> PushedImage:
            with _errors():
                return _oci.push_environment(
                    session,
                    folder,
                    folder.parent,
                    base_image=spec.base_image,
                    base_digest=spec.base_digest,
                    key=spec.key,
                    on_line=on_line,
                )

        return await anyio.to_thread.run_sync(push)
