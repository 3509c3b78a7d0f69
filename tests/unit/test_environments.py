"""Environment specs, keys, requirement files, archives and build errors."""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

import ascend
from ascend import _config, _environments
from ascend._environments import PYPI, EnvironmentSpec, spec_for
from ascend._resources import Resources
from ascend.backends import Job
from ascend.backends._kubernetes import _placement
from ascend_runner import _bootstrap, protocol
from tests.envindex import write_wheel
from tests.jobs import a_job

CLOUDPICKLE = importlib.metadata.version("cloudpickle")


def _spec(requirements: list[str], **settings: object) -> EnvironmentSpec:
    return spec_for(_config.resolve(settings), requirements)


def test_key_is_the_same_whatever_the_requirement_order_and_spelling() -> None:
    a = _spec(["NumPy>=2", "requests[socks,security]==2.32", "tqdm"])
    b = _spec(["tqdm", "requests[Security,SOCKS]==2.32", "numpy >= 2"])
    assert a.key == b.key


def test_key_changes_with_each_requirement() -> None:
    assert _spec(["numpy>=2"]).key != _spec(["numpy>=2.1"]).key


def test_key_is_stable_across_machines() -> None:
    """The key hashes only the spec's own fields, never a path or a host name."""
    spec = _spec(["numpy>=2"])
    again = EnvironmentSpec.from_json(spec.to_json())
    assert again == spec
    assert again.key == spec.key
    assert len(spec.key) == 64


def test_key_depends_on_base_image_digest_python_platform_indexes_and_builder() -> None:
    digest = "sha256:" + "a" * 64
    base = _spec(["numpy"])
    variants = [
        _spec(["numpy"], base_image=f"python:3.11-slim@{digest}"),
        spec_for(_config.resolve({}), ["numpy"], platform="linux/arm64"),
        _spec(["numpy"], index_url="https://example.invalid/simple"),
        _spec(["numpy"], find_links="/wheels"),
    ]
    import dataclasses

    variants.append(dataclasses.replace(base, python="3.12"))
    variants.append(dataclasses.replace(base, builder="999"))
    keys = {v.key for v in variants}
    assert base.key not in keys
    assert len(keys) == len(variants)
    assert variants[0].base_digest == digest


def test_default_base_image_is_the_official_slim_python_of_this_client() -> None:
    spec = _spec([])
    assert spec.base_image == f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
    assert spec.python == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert spec.platform == "linux/amd64"


def test_runner_dependencies_are_included_and_cloudpickle_pinned_to_the_clients() -> None:
    spec = _spec(["numpy"])
    names = {r.split("=")[0].split(">")[0] for r in spec.requirements}
    assert {"cloudpickle", "fsspec", "numpy"} <= names
    assert f"cloudpickle=={CLOUDPICKLE}" in spec.constraints


def test_object_storage_brings_the_runners_storage_extra() -> None:
    spec = _spec([], storage="s3://bucket/ascend")
    assert any(r.startswith("s3fs") for r in spec.requirements)
    assert not any(r.startswith("s3fs") for r in _spec([]).requirements)


def test_a_conflicting_cloudpickle_requirement_is_refused_naming_the_pin() -> None:
    with pytest.raises(ascend.ConfigError, match=rf"cloudpickle=={CLOUDPICKLE}.*Fix"):
        _spec(["cloudpickle<1"])


def test_a_compatible_cloudpickle_requirement_is_accepted() -> None:
    assert f"cloudpickle=={CLOUDPICKLE}" in _spec([f"cloudpickle>={CLOUDPICKLE}"]).constraints


def test_requirements_txt_is_read_with_its_includes_and_indexes(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("tqdm  # progress\n")
    (tmp_path / "requirements.txt").write_text(
        "--extra-index-url https://example.invalid/simple\n-r base.txt\n\nNumPy>=2 \\\n  ,<3\n"
    )
    spec = _spec([f"-r {tmp_path / 'requirements.txt'}"])
    assert {"numpy<3,>=2", "tqdm"} <= set(spec.requirements)
    assert spec.extra_index_urls == ("https://example.invalid/simple",)
    assert (
        spec.key
        == _spec(["tqdm", "numpy>=2,<3"], extra_index_url="https://example.invalid/simple").key
    )


def test_pyproject_dependencies_are_the_requirements(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "x"\nversion = "1"\ndependencies = ["tqdm>=4"]\n')
    assert "tqdm>=4" in _spec([f"-r {path}"]).requirements


def test_uv_lock_gives_root_dependencies_and_pins_every_version(tmp_path: Path) -> None:
    path = tmp_path / "uv.lock"
    path.write_text(
        'version = 1\n[[package]]\nname = "app"\nversion = "0.1"\nsource = { editable = "." }\n'
        'dependencies = [{ name = "tqdm" }]\n'
        '[[package]]\nname = "tqdm"\nversion = "4.67.1"\nsource = { registry = "https://pypi.org/simple" }\n'
    )
    spec = _spec([f"-r {path}"])
    assert "tqdm" in spec.requirements
    assert "tqdm==4.67.1" in spec.constraints


def test_a_path_as_requirements_is_accepted_by_the_decorator(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("tqdm\n")
    fn = ascend.remote(requirements=tmp_path / "requirements.txt")(lambda: 1)
    assert fn.resources.requirements == (f"-r {tmp_path / 'requirements.txt'}",)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("-e ./mypkg\n", "editable"),
        ("--pre\n", "not supported"),
        ("numpy=>2\n", "not a valid requirement"),
    ],
)
def test_unusable_requirements_file_lines_are_refused_naming_the_line(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text(content)
    with pytest.raises(ascend.ConfigError, match=rf"requirements.txt:1.*{problem}"):
        _spec([f"-r {path}"])


def test_a_missing_requirements_file_is_refused_at_decoration() -> None:
    with pytest.raises(ascend.ConfigError, match="no such file"):
        ascend.remote(requirements="does-not-exist/requirements.txt")


def test_a_bad_base_image_digest_is_refused() -> None:
    with pytest.raises(ascend.ConfigError, match="not a sha256 digest"):
        _spec([], base_image="python:3.11-slim@sha256:abc")


def test_local_calls_without_requirements_need_no_environment() -> None:
    settings = _config.resolve({})
    assert _environments.spec_for_call(settings, ascend.Resources.build(), "local") is None
    with_reqs = ascend.Resources.build(requirements=["tqdm"])
    spec = _environments.spec_for_call(settings, with_reqs, "local")
    assert spec is not None and spec.is_host


def test_kubernetes_calls_without_requirements_or_image_get_the_runner_only_environment() -> None:
    """No published runner image is needed: the runner arrives like a requirement."""
    settings = _config.resolve({})
    spec = _environments.spec_for_call(settings, ascend.Resources.build(), "kubernetes")
    assert spec is not None and not spec.is_host
    assert spec.base_image == f"python:{sys.version_info[0]}.{sys.version_info[1]}-slim"
    assert any(r.startswith("cloudpickle") for r in spec.requirements)
    assert any(c.startswith("cloudpickle==") for c in spec.constraints)
    assert spec == _environments.spec_for_call(settings, ascend.Resources.build(), "kubernetes")


@pytest.mark.parametrize("where", ["decorator", "settings"])
def test_kubernetes_calls_on_a_chosen_image_without_requirements_need_no_environment(
    where: str,
) -> None:
    settings = _config.resolve({"image": "team/runner:1"} if where == "settings" else {})
    resources = ascend.Resources.build(image="team/runner:1" if where == "decorator" else None)
    assert _environments.spec_for_call(settings, resources, "kubernetes") is None


def test_requirements_with_an_image_are_installed_on_that_image_not_ignored() -> None:
    settings = _config.resolve({})
    with_image = ascend.Resources.build(requirements=["tqdm"], image="mine:1")
    spec = _environments.spec_for_call(settings, with_image, "kubernetes")
    assert spec is not None
    assert spec.base_image == "mine:1"
    assert "tqdm" in spec.requirements


def _tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "pkg" / "sub" / "data.bin").write_bytes(bytes(range(256)))
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\n")
    (root / "bin" / "tool").chmod(0o775)
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"junk")


def test_archives_of_the_same_tree_are_byte_identical(tmp_path: Path) -> None:
    import os
    import time

    _tree(tmp_path / "a")
    time.sleep(0.01)
    _tree(tmp_path / "b")
    os.utime(tmp_path / "b" / "pkg" / "__init__.py", (12345, 12345))
    (tmp_path / "b" / "pkg" / "sub" / "data.bin").chmod(0o600)
    first = _environments._deterministic_tar(tmp_path / "a")
    assert first == _environments._deterministic_tar(tmp_path / "b")
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    assert not any("__pycache__" in m.name for m in members)
    assert {m.name: m.mode for m in members}["bin/tool"] == 0o755


@pytest.mark.anyio
async def test_no_wheel_for_the_target_platform_says_so_and_names_the_way_out(
    tmp_path: Path,
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "winonly", "1.0", {"winonly/__init__.py": b""}, tag="cp311-cp311-win_amd64")
    settings = _config.resolve({"index_url": "none", "find_links": str(wheels)})
    spec = spec_for(settings, ["winonly"])
    spec = __import__("dataclasses").replace(spec, requirements=("winonly",), constraints=())
    with pytest.raises(ascend.ImageBuildError) as caught:
        await _environments.build_archive(spec)
    error = caught.value
    assert error.requirement == "winonly"
    assert "no wheel for linux/amd64" in str(error)
    assert "find_links" in str(error)
    assert "winonly" in error.log


def test_bootstrap_names_match_the_protocol() -> None:
    source = Path(_bootstrap.__file__).read_text()
    names = (
        protocol.ENV_ENV_URL,
        protocol.ENV_ENV_SHA256,
        protocol.ENV_ENV_CACHE,
        protocol.ENV_STARTUP_TIMEOUT,
    )
    for name in names:
        assert f'"{name}"' in source
    assert _bootstrap.EXIT_UNAVAILABLE == protocol.ExitCode.ENVIRONMENT_UNAVAILABLE
    assert _bootstrap.EXIT_STARTUP_TIMEOUT == protocol.ExitCode.STARTUP_TIMEOUT


def test_bootstrap_refuses_an_archive_with_another_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "env.tar.gz"
    archive.write_bytes(_environments._deterministic_tar(tmp_path.parent))
    monkeypatch.setenv(protocol.ENV_ENV_URL, archive.as_uri())
    monkeypatch.setenv(protocol.ENV_ENV_SHA256, hashlib.sha256(b"other").hexdigest())
    monkeypatch.setenv(protocol.ENV_ENV_CACHE, str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exited:
        _bootstrap.main()
    assert exited.value.code == protocol.ExitCode.ENVIRONMENT_UNAVAILABLE
    assert "expected" in capsys.readouterr().err
    assert not (tmp_path / "cache" / hashlib.sha256(b"other").hexdigest()).exists()


# -- Kubernetes: the build Job and the pod command, as pure functions -----------------


def _build_job(**settings: object) -> tuple[EnvironmentSpec, dict[str, object]]:
    spec = _spec(["tqdm"], **settings)
    request = _environments.build_request(
        spec, runner="https://s/runner", archive="https://s/a", manifest="https://s/m", failure="f"
    )
    return spec, _environments.build_job_manifest(spec, request, startup_timeout=900)


def test_build_job_passes_the_restricted_pod_security_profile() -> None:
    _, job = _build_job()
    pod = job["spec"]["template"]["spec"]  # type: ignore[index]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in container["securityContext"]
    assert not any("hostPath" in v for v in pod.get("volumes", []))


def test_build_job_name_is_the_same_for_the_same_environment() -> None:
    spec, job = _build_job()
    _, again = _build_job()
    name = job["metadata"]["name"]  # type: ignore[index]
    assert name == again["metadata"]["name"] == f"ascend-env-{spec.key[:40]}"  # type: ignore[index]
    assert len(name) <= 63


def test_build_job_runs_once_within_startup_timeout_on_the_base_image() -> None:
    digest = "sha256:" + "b" * 64
    spec, job = _build_job(base_image=f"python:3.11-slim@{digest}")
    assert job["spec"]["backoffLimit"] == 0  # type: ignore[index]
    assert job["spec"]["activeDeadlineSeconds"] == 900  # type: ignore[index]
    [container] = job["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    assert container["image"] == f"python:3.11-slim@{digest}"
    assert container["command"][:3] == ["python", "-u", "-c"]
    request = json.loads(next(e["value"] for e in container["env"] if e["name"] == "ASCEND_BUILD"))
    assert "--python-platform" in request["uv"]
    assert request["manifest_body"]["key"] == spec.key


def test_build_pod_installs_uv_from_the_configured_indexes() -> None:
    spec = _spec(["tqdm"], index_url="none", find_links="http://10.0.0.1:8000/wheels/")
    request = _environments.build_request(spec, runner="r", archive="a", manifest="m", failure="f")
    assert request["pip"][:3] == ["--no-index", "--find-links", "http://10.0.0.1:8000/wheels/"]
    assert [t.split("==")[0] for t in request["tools"]] == ["uv"]
    assert "--no-index" in request["uv"]


def test_an_image_build_installs_oras_too_and_pushes_instead_of_publishing() -> None:
    spec = _spec(["tqdm"], base_image="python:3.11-slim@sha256:" + "b" * 64)
    request = _environments.build_request(
        spec, runner="r", failure=None, registry="http://reg:5000/envs"
    )
    assert [t.split("==")[0] for t in request["tools"]] == ["uv", "oras"]
    assert request["image"] == {
        "registry": "http://reg:5000/envs",
        "key": spec.key,
        "base_image": "python:3.11-slim",
        "base_digest": "sha256:" + "b" * 64,
    }
    assert "archive" not in request and "manifest_body" not in request


def test_an_image_build_job_mounts_the_registry_secret_as_its_docker_config() -> None:
    spec = _spec(["tqdm"])
    request = _environments.build_request(spec, runner="r", failure=None, registry="reg/envs")
    name = _environments.image_build_job_name(spec.key, "reg/envs")
    job = _environments.build_job_manifest(
        spec, request, startup_timeout=900, name=name, registry_secret="push-creds"
    )
    assert job["metadata"]["name"] == name != _environments.build_job_name(spec.key)
    assert len(name) <= 63
    assert name != _environments.image_build_job_name(spec.key, "other/envs")
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"] == [
        {
            "name": "registry-auth",
            "secret": {
                "secretName": "push-creds",
                "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
            },
        }
    ]
    [container] = pod["containers"]
    [mount] = container["volumeMounts"]
    assert mount["readOnly"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["DOCKER_CONFIG"] == mount["mountPath"]
    # Still the restricted profile: a Secret volume is allowed, a hostPath is not.
    assert pod["securityContext"]["runAsNonRoot"] is True
    without = _environments.build_job_manifest(spec, request, startup_timeout=900)
    assert "volumes" not in without["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("challenge", "backend"),
    [
        ('Basic realm="ascend-test"', "basic"),
        ('Bearer realm="https://ghcr.io/token",service="ghcr.io"', "token"),
        ("", "token"),
    ],
)
def test_the_registry_auth_flow_follows_its_challenge(challenge: str, backend: str) -> None:
    from ascend_runner import _oci

    assert _oci.auth_scheme(challenge) == backend


def test_credentials_come_from_docker_config_when_it_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ascend_runner import _oci

    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    assert _oci.docker_configs() == []
    monkeypatch.setenv("DOCKER_CONFIG", "/var/run/ascend/registry-auth")
    assert _oci.docker_configs() == ["/var/run/ascend/registry-auth/config.json"]


@pytest.mark.parametrize("name", ["Has_Upper", "-x", "a" * 254, ""])
def test_a_registry_secret_that_is_no_secret_name_is_refused(name: str) -> None:
    with pytest.raises(ascend.ConfigError, match="registry_secret"):
        _config.Settings(registry_secret=name)


def test_build_pod_trusts_the_plain_http_indexes_it_was_given() -> None:
    """pip ignores plain-HTTP links on any host but localhost unless they are trusted."""
    spec = _spec(
        ["tqdm"],
        index_url="http://mirror.internal/simple",
        find_links="http://10.0.0.1:8000/wheels/",
    )
    request = _environments.build_request(spec, runner="r", archive="a", manifest="m", failure="f")
    pip = request["pip"]
    trusted = [pip[i + 1] for i, arg in enumerate(pip) if arg == "--trusted-host"]
    assert trusted == ["mirror.internal", "10.0.0.1:8000"]
    https = _spec(["tqdm"], index_url="https://pypi.org/simple")
    assert "--trusted-host" not in _environments.pip_index_args(https)


# -- registry mode: layers ---------------------------------------------------------------


def _installed_tree(root: Path, deps: dict[str, int]) -> Path:
    """A fake ``--target`` install: one package per entry (name -> bytes), with RECORDs."""
    for name, size in deps.items():
        module = name.replace("-", "_")
        (root / module).mkdir(parents=True)
        (root / module / "__init__.py").write_bytes(b"x" * size)
        info = root / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Name: {name}\nVersion: 1.0\n")
        (info / "RECORD").write_text(
            f"{module}/__init__.py,,\n{module}-1.0.dist-info/METADATA,,\n"
            f"{module}-1.0.dist-info/RECORD,,\n"
        )
    _environments.add_runner(root)
    return root


def test_heavy_distributions_get_layers_of_their_own_and_the_runner_its_own(
    tmp_path: Path,
) -> None:
    from ascend import _registry

    root = _installed_tree(
        tmp_path, {"torch": 10, "nvidia-cublas-cu12": 10, "tqdm": 10, "big": 900}
    )
    layers = _registry.split_layers(root, heavy_bytes=500)
    names = [layer.name for layer in layers]
    assert names == ["big", "nvidia-cublas-cu12", "torch", "deps", "runner"]
    by_name = {layer.name: layer.entries for layer in layers}
    assert "torch/__init__.py" in by_name["torch"]
    assert "tqdm/__init__.py" in by_name["deps"]
    assert all(e.startswith("ascend_runner") for e in by_name["runner"])
    every = [e for layer in layers for e in layer.entries]
    assert len(every) == len(set(every))  # each entry in exactly one layer


def test_a_small_change_changes_only_the_small_layers_digest(tmp_path: Path) -> None:
    from ascend import _registry

    a = _installed_tree(tmp_path / "a", {"torch": 10, "tqdm": 10})
    b = _installed_tree(tmp_path / "b", {"torch": 10, "tqdm": 10, "six": 5})

    def digests(root: Path) -> dict[str, str]:
        return {
            layer.name: _registry.layer_blob(root, layer, tmp_path / f"{layer.name}.tgz").digest
            for layer in _registry.split_layers(root)
        }

    first, second = digests(a), digests(b)
    assert first["torch"] == second["torch"]
    assert first["runner"] == second["runner"]
    assert first["deps"] != second["deps"]
    assert first == digests(a)  # byte-identical across runs


def test_image_config_appends_our_layers_and_sets_pythonpath() -> None:
    from ascend import _registry

    base = {"config": {"Env": ["PATH=/bin", "PYTHONPATH=/x"]}, "rootfs": {"diff_ids": ["sha256:a"]}}
    blob = _registry.Blob("deps", Path("x"), "sha256:b", "sha256:c", 0)
    config = _registry.image_config(base, [blob], "k" * 64)
    assert config["rootfs"]["diff_ids"] == ["sha256:a", "sha256:c"]
    assert "PYTHONPATH=/opt/ascend/env" in config["config"]["Env"]
    assert "PYTHONPATH=/x" not in config["config"]["Env"]
    assert base["config"]["Env"] == ["PATH=/bin", "PYTHONPATH=/x"]  # not modified


@pytest.mark.parametrize("value", ["ghcr.io", "", "http://"])
def test_a_registry_without_a_repository_is_refused(value: str) -> None:
    from ascend import _registry

    with pytest.raises(ascend.ConfigError, match="host\\[:port\\]/repository"):
        _registry.parse_target(value)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("http://127.0.0.1:5000/Bad_Repo", "not an OCI repository name"),
        ("ghcr.io/org//envs", "not an OCI repository name"),
        ("ftp://host/envs", "host\\[:port\\]/repository"),
    ],
)
def test_a_registry_whose_repository_no_registry_accepts_is_refused_up_front(
    value: str, named: str
) -> None:
    from ascend import _registry

    with pytest.raises(ascend.ConfigError, match=named):
        _registry.parse_target(value)
    assert _registry.parse_target("http://127.0.0.1:5000/my-org/ascend_envs.v2").insecure


def test_the_clusters_index_is_not_read_when_the_user_named_one() -> None:
    """Reading the namespace's ascend-defaults needs the cluster; a build whose index
    the user named needs nothing from it (a laptop off the VPN can build)."""
    import anyio

    class Backend:
        reads = 0

        async def cluster_defaults(self, settings: object) -> dict[str, str]:
            Backend.reads += 1
            return {"index_url": "http://cluster-mirror/simple"}

    named = _config.resolve({"index_url": "https://mirror.internal/simple"})
    spec = _environments.spec_for(named, ["tqdm"])
    resolved = anyio.run(_environments.resolve_spec, spec, named, Resources(), Backend(), print)
    assert resolved == spec and Backend.reads == 0
    unnamed = _config.resolve({})
    spec = _environments.spec_for(unnamed, ["tqdm"])
    resolved = anyio.run(_environments.resolve_spec, spec, unnamed, Resources(), Backend(), print)
    assert resolved.index_url == "http://cluster-mirror/simple" and Backend.reads == 1


def test_a_base_image_in_another_registry_is_refused_naming_the_mirror_fix() -> None:
    from ascend import _registry

    spec = _spec([], base_image="quay.io/org/python:3.11")
    target = _registry.Target.parse("ghcr.io/me/envs")
    with pytest.raises(ascend.ConfigError, match="mirror the base image"):
        _registry._base_location(spec, target)
    official = _spec([])
    assert _registry._base_location(official, target)[0] == "library/python"


def test_a_uv_lock_without_a_project_of_its_own_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "uv.lock"
    path.write_text('version = 1\n[[package]]\nname = "tqdm"\nversion = "4"\n')
    with pytest.raises(ascend.ConfigError, match="no project of its own"):
        _spec([f"-r {path}"])


def test_dynamic_pyproject_dependencies_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "x"\ndynamic = ["dependencies", "version"]\n')
    with pytest.raises(ascend.ConfigError, match="dynamic"):
        _spec([f"-r {path}"])


def test_a_lock_file_pinning_another_cloudpickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "uv.lock"
    path.write_text(
        'version = 1\n[[package]]\nname = "app"\nversion = "0.1"\nsource = { virtual = "." }\n'
        'dependencies = [{ name = "cloudpickle" }]\n'
        '[[package]]\nname = "cloudpickle"\nversion = "1.0.0"\n'
    )
    with pytest.raises(ascend.ConfigError, match=rf"cloudpickle=={CLOUDPICKLE}"):
        _spec([f"-r {path}"])


def test_an_unsupported_platform_is_refused_naming_the_supported_ones() -> None:
    with pytest.raises(ascend.ConfigError, match="linux/amd64"):
        spec_for(_config.resolve({}), [], platform="windows/amd64")


def test_bootstrap_refuses_an_archive_whose_entries_leave_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    archive = tmp_path / "env.tar.gz"
    archive.write_bytes(raw.getvalue())
    digest = hashlib.sha256(raw.getvalue()).hexdigest()
    monkeypatch.setenv(protocol.ENV_ENV_URL, str(archive))
    monkeypatch.setenv(protocol.ENV_ENV_SHA256, digest)
    monkeypatch.setenv(protocol.ENV_ENV_CACHE, str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exited:
        _bootstrap.main()
    assert exited.value.code == protocol.ExitCode.ENVIRONMENT_UNAVAILABLE
    assert "cannot unpack" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()


def test_bootstrap_names_an_unreadable_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(protocol.ENV_ENV_URL, f"file://{tmp_path}/missing.tar.gz")
    monkeypatch.setenv(protocol.ENV_ENV_SHA256, "0" * 64)
    monkeypatch.setenv(protocol.ENV_ENV_CACHE, str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exited:
        _bootstrap.main()
    assert exited.value.code == protocol.ExitCode.ENVIRONMENT_UNAVAILABLE
    assert "missing.tar.gz" in capsys.readouterr().err


def test_the_clusters_index_is_used_only_when_the_user_named_none() -> None:
    defaults = {"index_url": "none", "find_links": "http://10.0.0.1:8000/"}
    plain = _config.resolve({})
    spec = spec_for(plain, ["tqdm"])
    applied = _environments.with_cluster_defaults(spec, plain, defaults)
    assert applied.index_url == "none"
    assert applied.find_links == ("http://10.0.0.1:8000/",)
    assert applied.key != spec.key
    chosen = _config.resolve({"index_url": "https://mirror.example/simple"})
    own = spec_for(chosen, ["tqdm"])
    assert _environments.with_cluster_defaults(own, chosen, defaults) == own
    assert _environments.with_cluster_defaults(spec, plain, {}) == spec


# -- an unreachable package index is not a requirement's fault -----------------------

UV_OUTPUT = Path(__file__).parent / "fixtures" / "uv"


def _log(name: str) -> list[str]:
    """uv's or pip's output, recorded against a closed port, a name no DNS knows and a
    server that never answers (tests/unit/fixtures/uv)."""
    return (UV_OUTPUT / name).read_text().splitlines()


@pytest.mark.parametrize(
    ("log", "index", "cause"),
    [
        ("uv_refused.txt", "http://127.0.0.1:9/simple/", "Connection refused"),
        ("uv_dns.txt", "https://pypi.no-such-host.invalid/simple/", "Name or service not known"),
        ("uv_timeout.txt", "http://127.0.0.1:40404/simple/", "operation timed out"),
        ("pip_refused.txt", "http://127.0.0.1:9/simple/", "Connection refused"),
        ("pip_dns.txt", "https://pypi.no-such-host.invalid/simple/", "Name or service not known"),
        ("pip_timeout.txt", "http://127.0.0.1:40404/simple/", "Read timed out"),
    ],
)
def test_an_unreachable_index_names_the_index_and_its_setting_not_a_requirement(
    log: str, index: str, cause: str
) -> None:
    spec = _spec(["cloudpickle", "ascend-envtest-pkg"], index_url=index)
    error = _environments.build_error(spec, _log(log), "uv exited with code 2")
    assert error.requirement is None
    message = str(error)
    assert f"the package index {index} is unreachable from this machine" in message
    assert cause in message
    assert "index_url=... (ASCEND_INDEX_URL)" in message
    assert "requirements are not at fault" in message
    assert "requirement 'cloudpickle" not in message


def test_an_unreachable_extra_index_names_the_extra_index_url_setting() -> None:
    spec = _spec(
        ["cloudpickle", "ascend-envtest-pkg"],
        index_url="http://127.0.0.1:9/simple/",
        extra_index_url="http://127.0.0.1:7/extra/",
    )
    error = _environments.build_error(spec, _log("uv_extra_refused.txt"), "uv")
    assert "the package index http://127.0.0.1:7/extra/ is unreachable" in str(error)
    assert "extra_index_url=... (ASCEND_EXTRA_INDEX_URL)" in str(error)


def test_an_unreachable_default_index_says_pypi_was_used() -> None:
    log = [line.replace("http://127.0.0.1:9/simple", PYPI) for line in _log("uv_refused.txt")]
    error = _environments.build_error(_spec(["cloudpickle"]), log, "uv")
    assert f"the package index {PYPI} is unreachable" in str(error)
    assert "unset, uv's default, PyPI, was used" in str(error)


def test_an_unreachable_index_in_a_build_pod_says_the_cluster_cannot_reach_it() -> None:
    spec = _spec(["cloudpickle"], index_url="http://127.0.0.1:9/simple/")
    error = _environments.build_error(spec, _log("pip_refused.txt"), "build Job x", in_cluster=True)
    assert "unreachable from the cluster's build pod" in str(error)
    assert "ascend-defaults ConfigMap" in str(error)


def test_an_index_url_with_credentials_is_named_without_them() -> None:
    index = "https://user:s3cret@pypi.no-such-host.invalid/simple/"
    error = _environments.build_error(
        _spec(["cloudpickle"], index_url=index), _log("uv_dns.txt"), "uv"
    )
    assert "https://pypi.no-such-host.invalid/simple/ is unreachable" in str(error)
    assert "s3cret" not in str(error).split("Last lines")[0]


def test_a_requirement_no_index_has_still_names_that_requirement() -> None:
    spec = _spec(["cloudpickle", "ascend-envtest-missing"], index_url="none")
    error = _environments.build_error(spec, _log("uv_missing.txt"), "uv")
    assert "unreachable" not in str(error)
    assert error.requirement is not None and "cloudpickle" in error.requirement


def test_a_connection_refused_after_the_install_is_not_an_unreachable_index() -> None:
    spec = _spec(["cloudpickle"], index_url="http://127.0.0.1:9/simple/")
    log = ["Installed 3 packages in 12ms", "OSError: [Errno 111] Connection refused (publishing)"]
    assert _environments.unreachable_index(spec, "\n".join(log)) is None


# -- CUDA builds of torch, chosen from the target nodes' GPU Feature Discovery labels --


def _nodes(drivers: dict[str, str | None]) -> list[dict[str, Any]]:
    """The test cluster's recorded nodes (tests/unit/fixtures/k8s/nodes.json), each
    named in ``drivers`` given that GFD driver label (``None``: left unlabelled); a
    name not in the recording is a copy of its GPU node."""
    recorded = json.loads((Path(__file__).parent / "fixtures" / "k8s" / "nodes.json").read_text())
    by_name = {n["metadata"]["name"]: n for n in recorded["nodes"]}
    out = []
    for name in sorted({*by_name, *drivers}):
        node = copy.deepcopy(by_name.get(name) or by_name["gpu-1"])
        node["metadata"]["name"] = name
        if drivers.get(name) is not None:
            node["metadata"]["labels"]["nvidia.com/cuda.driver.major"] = drivers[name]
        out.append(node)
    return out


def _request(**options: Any) -> _placement.Request:
    return _placement.request_of(Resources.build(**options), _config.resolve({}))


@pytest.mark.parametrize(
    ("driver", "tag"),
    [
        (580, "cu130"), (590, "cu130"), (575, "cu129"), (570, "cu128"), (565, "cu126"),
        (560, "cu126"), (555, "cu124"), (550, "cu124"), (535, "cu121"), (530, "cu121"),
        (525, "cu118"), (520, "cu118"),
    ],
)  # fmt: skip
def test_a_driver_major_picks_the_newest_cuda_build_of_torch_it_runs(driver: int, tag: str) -> None:
    assert _environments.torch_cuda_index(driver) == f"https://download.pytorch.org/whl/{tag}"


def test_a_driver_older_than_any_cuda_build_of_torch_picks_none() -> None:
    assert _environments.torch_cuda_index(470) is None


def test_the_driver_of_a_gpu_calls_target_nodes_is_read_from_their_gfd_label() -> None:
    nodes = _nodes({"gpu-1": "550"})
    assert _placement.driver_major_of_targets(_request(gpu=1), nodes) == 550


def test_the_newer_gfd_label_spelling_is_read_too() -> None:
    [node] = [n for n in _nodes({}) if n["metadata"]["name"] == "gpu-1"]
    node["metadata"]["labels"]["nvidia.com/cuda.driver-version.major"] = "570"
    assert _placement.cuda_driver_major(node) == 570


def test_target_nodes_with_different_drivers_give_the_lowest() -> None:
    nodes = _nodes({"gpu-1": "570", "gpu-2": "550"})
    assert _placement.driver_major_of_targets(_request(gpu=1), nodes) == 550


def test_only_the_nodes_a_call_can_run_on_count() -> None:
    # A CPU node's label (or its absence) says nothing about where a GPU call runs.
    nodes = _nodes({"gpu-1": "570", "cpu-1": "470"})
    assert _placement.driver_major_of_targets(_request(gpu=1), nodes) == 570


def test_a_target_node_without_the_label_leaves_the_driver_unknown() -> None:
    nodes = _nodes({"gpu-1": "570", "gpu-2": None})
    assert _placement.driver_major_of_targets(_request(gpu=1), nodes) is None


def test_a_call_asking_for_no_gpu_has_no_target_driver() -> None:
    nodes = _nodes({"gpu-1": "570"})
    assert _placement.driver_major_of_targets(_request(), nodes) is None


@pytest.mark.parametrize(
    ("requirements", "settings", "wanted"),
    [
        (["torch==2.6"], {}, True),
        (["torchvision"], {}, True),
        (["numpy"], {}, False),
        (["torch==2.5.1+cu121"], {}, False),  # a CUDA build is pinned already
        (["torch"], {"index_url": "https://mirror.internal/simple"}, False),
        (["torch"], {"extra_index_url": "https://download.pytorch.org/whl/cu118"}, False),
    ],
)
def test_a_cuda_index_is_added_only_for_torch_on_the_default_index(
    requirements: list[str], settings: dict[str, Any], wanted: bool
) -> None:
    assert _environments.wants_torch_index(_spec(requirements, **settings)) is wanted


class _GpuCluster:
    """A backend whose target nodes carry a driver label; records the spec it is asked
    to build (the build itself is another test's subject)."""

    def __init__(self, major: int | None) -> None:
        self.major = major
        self.built: list[EnvironmentSpec] = []

    async def cuda_driver_major(self, resources: Any, settings: Any) -> int | None:
        return self.major if resources.gpu else None

    async def ensure_environment(self, settings: Any, spec: EnvironmentSpec, *_: Any) -> Any:
        self.built.append(spec)
        raise LookupError("not built here")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("major", "extra"), [(550, ("https://download.pytorch.org/whl/cu124",)), (None, ())]
)
async def test_a_torch_environment_for_labelled_gpu_nodes_resolves_against_their_cuda_index(
    major: int | None, extra: tuple[str, ...]
) -> None:
    settings = _config.resolve({"storage": "file:///tmp/unused"})
    spec = spec_for(settings, ["torch==2.6"], platform="linux/amd64")
    job = a_job(settings, resources=Resources.build(gpu=1), environment_spec=spec)
    backend = _GpuCluster(major)
    lines: list[str] = []
    with pytest.raises(LookupError):
        await _environments.prepare(job, None, backend, lines.append)  # type: ignore[arg-type]
    [built] = backend.built
    assert built.extra_index_urls == extra
    assert (built.key != spec.key) is bool(extra)
    assert bool(lines) is bool(extra)


# -- the runner's start, visible through the API: the bootstrap's startup probe -------


def _pod_job(image: str | None = None, timeout: float | None = None, **settings: Any) -> Job:
    resolved = _config.resolve({"storage": "file:///tmp/unused", **settings})
    spec = spec_for(resolved, ["tqdm"], platform="linux/amd64")
    environment = _environments.Environment(spec, "/s/a.tar.gz", "a" * 64, 1, image=image)
    return a_job(
        resolved,
        resources=Resources.build(timeout=timeout),
        environment_spec=spec,
        environment=environment,
        environment_url="/s/a.tar.gz",
    )


def _container(job: Job) -> dict[str, Any]:
    from ascend.backends._kubernetes._spec import job_manifest

    [container] = job_manifest(job, session="s")["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_a_bootstrap_pod_has_a_startup_probe_on_the_file_the_bootstrap_writes() -> None:
    from ascend.backends._kubernetes._spec import STARTED_FILE

    container = _container(_pod_job(startup_timeout=300))
    probe = container["startupProbe"]
    assert STARTED_FILE in " ".join(probe["exec"]["command"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[protocol.ENV_STARTED_FILE] == STARTED_FILE
    assert env[protocol.ENV_STARTUP_TIMEOUT] == "300"
    # The kubelet never gives up before the client does.
    assert probe["periodSeconds"] * probe["failureThreshold"] > 300


def test_a_pod_on_its_environments_image_needs_no_startup_probe() -> None:
    container = _container(_pod_job(image="registry.example/env@sha256:" + "c" * 64))
    assert "startupProbe" not in container
    assert protocol.ENV_STARTED_FILE not in {e["name"] for e in container["env"]}


def test_the_runner_is_told_its_timeout_and_the_pod_deadline_adds_startup_timeout() -> None:
    from ascend.backends._kubernetes._spec import job_manifest

    job = _pod_job(timeout=2.5, startup_timeout=60)
    env = {e["name"]: e.get("value") for e in _container(job)["env"]}
    assert env[protocol.ENV_RUN_TIMEOUT] == "2.5"
    manifest = job_manifest(job, session="s")
    assert manifest["spec"]["template"]["spec"]["activeDeadlineSeconds"] == 63  # ceil(62.5)


class _LabelledCluster(_GpuCluster):
    """A GPU cluster that also publishes default package sources (the ascend-defaults
    ConfigMap)."""

    async def cluster_defaults(self, settings: Any) -> dict[str, str]:
        return {"extra_index_url": "https://mirror.example/simple"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("gpu", "extra"), [(1, ("https://download.pytorch.org/whl/cu124",)), (0, ())]
)
async def test_env_build_and_calls_resolve_one_spec_from_the_clusters_defaults_and_driver(
    gpu: int, extra: tuple[str, ...]
) -> None:
    """What ``ascend env build --gpu`` builds is what a call with ``gpu=`` runs: the
    cluster's index, and torch's CUDA index for GPU nodes only."""
    settings = _config.resolve({"storage": "file:///tmp/unused"})
    spec = spec_for(settings, ["torch==2.6"], platform="linux/amd64")
    lines: list[str] = []
    resolved = await _environments.resolve_spec(
        spec, settings, Resources.build(gpu=gpu), _LabelledCluster(550), lines.append
    )
    assert resolved.extra_index_urls == tuple(sorted(("https://mirror.example/simple", *extra)))
    assert bool(lines) is bool(extra)  # the choice of CUDA index is said
