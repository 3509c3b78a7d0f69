"""Registry mode against the suite's OCI registry (distribution 2.8): push, existence
check by tag, pull by digest, and only the small layer moving when a small requirement
changes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import anyio
import pytest

import ascend
from ascend import _config, _environments, _registry
from ascend._errors import ImageBuildError
from tests.cluster.stores import Registry
from tests.envindex import TEST_PACKAGE, wheel_index, write_wheel
from tests.integration.test_environments import _run_build_pod_script

pytestmark = [pytest.mark.stores, pytest.mark.slow]

HEAVY_PACKAGE = "nvidia-envtest-heavy"
SMALL_PACKAGE = "ascend-envtest-small"


@pytest.fixture(scope="session")
def registry_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = wheel_index(tmp_path_factory.mktemp("registry-wheels"), with_build_tools=True)
    heavy = {f"nvidia_envtest_heavy/lib{i}.so": bytes([i]) * 200_000 for i in range(3)}
    write_wheel(folder, HEAVY_PACKAGE, "1.0", {**heavy, "nvidia_envtest_heavy/__init__.py": b""})
    write_wheel(folder, SMALL_PACKAGE, "1.0", {"ascend_envtest_small/__init__.py": b"X = 1\n"})
    return folder


def _push_base_image(registry: Registry, work: Path) -> list[str]:
    """A tiny stand-in for python:3.11-slim, where a docker.io mirror keeps it."""
    session = _registry._session(_registry.parse_target(f"http://{registry.url}/library/python"))
    tree = work / "base-tree"
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "base-release").write_text("base image file\n")
    layer = _registry.layer_blob(
        tree, _registry.Layer("base", ("etc", "etc/base-release")), work / "base.tgz"
    )
    config = _registry.canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["python3"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        }
    )
    session.upload(layer.path, layer.digest, _registry.LAYER_MEDIA_TYPE)
    config_digest = f"sha256:{hashlib.sha256(config).hexdigest()}"
    (work / "base-config.json").write_bytes(config)
    session.upload(work / "base-config.json", config_digest, _registry.CONFIG_MEDIA_TYPE)
    manifest = {
        "schemaVersion": 2,
        "mediaType": _registry.MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": _registry.CONFIG_MEDIA_TYPE,
            "digest": config_digest,
            "size": len(config),
        },
        "layers": [
            {"mediaType": _registry.LAYER_MEDIA_TYPE, "digest": layer.digest, "size": layer.size}
        ],
    }
    session.put_manifest(manifest, "3.11-slim")
    return [layer.digest]


@pytest.fixture
def target(oci_registry: Registry, registry_wheels: Path, tmp_path: Path) -> tuple[str, list[str]]:
    base_layers = _push_base_image(oci_registry, tmp_path)
    ascend_settings = {"index_url": "none", "find_links": str(registry_wheels)}
    _config.reset()
    import ascend

    ascend.configure(**ascend_settings)
    return f"http://{oci_registry.url}/ascend-envs", base_layers


def _spec(requirements: list[str]) -> _environments.EnvironmentSpec:
    return _environments.spec_for(_config.current(), requirements, base_image="python:3.11-slim")


def test_an_environment_is_pushed_as_the_base_image_plus_its_layers(
    target: tuple[str, list[str]],
) -> None:
    registry, base_layers = target
    spec = _spec([TEST_PACKAGE, HEAVY_PACKAGE])
    pushed = anyio.run(_registry.ensure_image, spec, registry)
    assert pushed.ref.startswith(registry.removeprefix("http://") + "@sha256:")
    session = _registry._session(_registry.parse_target(registry))
    manifest = session.manifest("ascend-envs", pushed.ref.rsplit("@", 1)[1])
    digests = [layer["digest"] for layer in manifest["layers"]]
    assert digests == [*base_layers, *pushed.layers]
    assert len(pushed.layers) == 3  # the heavy package, the rest, the runner
    config = json.loads(session.blob("ascend-envs", manifest["config"]["digest"]))
    assert "PYTHONPATH=/opt/ascend/env" in config["config"]["Env"]
    assert len(config["rootfs"]["diff_ids"]) == len(digests)
    for digest in pushed.layers:  # pulled by digest, each as pushed
        assert f"sha256:{hashlib.sha256(session.blob('ascend-envs', digest)).hexdigest()}" == digest
    with tarfile.open(fileobj=io.BytesIO(session.blob("ascend-envs", pushed.layers[0]))) as tar:
        names = tar.getnames()
    assert any(n.startswith("opt/ascend/env/nvidia_envtest_heavy/") for n in names)
    # A module's bytecode travels in its distribution's layer.
    assert any(n.startswith("opt/ascend/env/nvidia_envtest_heavy/__pycache__/") for n in names)


def test_a_second_request_finds_the_image_and_pushes_nothing(
    target: tuple[str, list[str]],
) -> None:
    registry, _ = target
    spec = _spec([TEST_PACKAGE])
    first = anyio.run(_registry.ensure_image, spec, registry)
    again = anyio.run(_registry.ensure_image, spec, registry)
    assert again.ref == first.ref
    assert again.layers == first.layers
    assert again.uploaded == 0


def test_changing_a_small_requirement_pushes_only_the_small_layer(
    target: tuple[str, list[str]],
) -> None:
    registry, _ = target
    first = anyio.run(_registry.ensure_image, _spec([TEST_PACKAGE, HEAVY_PACKAGE]), registry)
    second = anyio.run(
        _registry.ensure_image, _spec([TEST_PACKAGE, HEAVY_PACKAGE, SMALL_PACKAGE]), registry
    )
    heavy, deps, runner = first.layers
    heavy2, deps2, runner2 = second.layers
    assert (heavy2, runner2) == (heavy, runner)
    assert deps2 != deps
    assert second.uploaded == 2  # the changed layer and the new config; nothing else


# -- the build pod's push (its script, run as the pod runs it) --------------------------


def _tagged_layers(registry: str, key: str) -> list[str]:
    session = _registry._session(_registry.parse_target(registry))
    manifest = session.manifest(_registry.parse_target(registry).repository, key)
    return [layer["digest"] for layer in manifest["layers"]]


def test_the_build_pod_pushes_the_same_layers_as_a_build_on_this_machine(
    target: tuple[str, list[str]], tmp_path: Path
) -> None:
    """Built in a pod or on a laptop, the same environment is the same bytes: the pod's
    script installs oras-py from the index, layers the environment and pushes it."""
    registry, base_layers = target
    requirements = [TEST_PACKAGE, HEAVY_PACKAGE]
    done, spec = _run_build_pod_script(
        _config.current(), requirements, tmp_path / "pod", registry=registry
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ascend-build: pushing layer" in done.stdout  # the push is in the pod's log
    pod_layers = _tagged_layers(registry, spec.key)
    here = anyio.run(_registry.ensure_image, spec, registry.replace("ascend-envs", "envs-here"))
    assert pod_layers == [*base_layers, *here.layers]
    assert len(here.layers) == 3  # the heavy package, the rest, the runner


def test_the_build_pod_pushes_to_a_private_registry_with_the_docker_config_it_is_given(
    private_registry: Registry,
    registry_wheels: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Secret mounted into a build pod is a Docker config: with it the push goes
    through; without it the registry's refusal fails the build, saying so — not blaming
    the requirements — and so does this client's own lookup."""
    config = private_registry.docker_config(tmp_path / "docker")
    monkeypatch.setenv("DOCKER_CONFIG", str(config.parent))
    base_layers = _push_base_image(private_registry, tmp_path)
    registry = f"http://{private_registry.url}/ascend-envs"
    settings = _config.resolve({"index_url": "none", "find_links": str(registry_wheels)})
    done, spec = _run_build_pod_script(
        settings,
        [TEST_PACKAGE],
        tmp_path / "pod",
        registry=registry,
        env={"DOCKER_CONFIG": str(config.parent)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = anyio.run(_registry.find_image, spec, registry)
    assert found is not None and found.ref.startswith(f"{private_registry.url}/ascend-envs@")
    assert _tagged_layers(registry, spec.key)[: len(base_layers)] == base_layers

    refused, other = _run_build_pod_script(
        settings, [TEST_PACKAGE, SMALL_PACKAGE], tmp_path / "pod-without", registry=registry
    )
    assert refused.returncode == 1
    assert "pushing the image failed" in refused.stdout
    assert f"registry {private_registry.url}" in refused.stdout
    failure = json.loads(
        (
            Path(settings.storage.removeprefix("file://"))
            / "envs"
            / "sha256"
            / f"{other.key}.failed"
        ).read_text()
    )
    assert failure["message"].startswith("pushing the image failed")
    assert "docker login" in failure["message"]

    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nobody"))
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))
    with pytest.raises(ImageBuildError, match="holds none for .*docker login"):
        anyio.run(_registry.find_image, spec, registry)


def test_a_base_image_the_registry_lacks_fails_before_the_install(
    target: tuple[str, list[str]],
) -> None:
    registry, _ = target
    spec = _environments.spec_for(_config.current(), [TEST_PACKAGE], base_image="python:3.99-slim")
    lines: list[str] = []
    with pytest.raises(ascend.ConfigError, match="not in .* library/python:3.99-slim.*skopeo"):
        anyio.run(_registry.ensure_image, spec, registry, lines.append)
    assert lines == []  # nothing was installed
