"""Real container images for the test nodes, built without Docker from Debian packages.

- ``python:X.Y-slim``: a Debian minbase root (``debootstrap --variant=minbase
  --include=python3,python3-pip``) whose ``python3`` is the test environment's ``X.Y``
  (bookworm's is 3.11), with ``python`` linked to it and pip, as the official image has;
- the runner image (the client's default image name, ``_spec.default_image()``): that
  base plus a layer with ``ascend-k8s-runner[s3,gcs,azure]`` and the test environment's
  cloudpickle installed by ``uv pip install --target``, user 10001 as in
  ``runner/Dockerfile``, plus layers with what the suite's test functions import in pods
  (``TEST_PACKAGES``: NumPy, and ascend for nested calls) copied from the test venv;
- the pod sandbox image (``registry.k8s.io/pause``): Debian's static busybox sleeping.

Layers are built once and cached outside the repo under
``<cache>/images/<key>/`` (the key names the Debian release, the Python version and a hash
of the runner's sources), then pushed to the suite's registry with the registry HTTP API
under the names users write; each node's containerd resolves ``docker.io``, ``ghcr.io``
and ``registry.k8s.io`` through mirror entries pointing at that registry.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.cluster import debs
from tests.cluster.build import cache_root

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
RUNNER_DIR = Path(__file__).resolve().parents[2] / "runner"
RUNNER_UID = 10001
# The official python:X.Y-slim has pip: environment build pods install uv with it.
BASE_PACKAGES = ("python3", "python3-pip")


@dataclass(frozen=True)
class Blob:
    path: Path
    digest: str  # of the compressed bytes
    diff_id: str  # of the uncompressed tar
    size: int


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _root() -> Path:
    path = cache_root() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _layer(tar_path: Path, out: Path) -> Blob:
    """gzip ``tar_path`` into ``out`` (fast level: the registry is local)."""
    diff_id = _sha256_file(tar_path)
    with tar_path.open("rb") as src, gzip.open(out, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    tar_path.unlink()
    return Blob(out, _sha256_file(out), diff_id, out.stat().st_size)


def _cached(name: str, make: object) -> Blob:
    """A layer cached as ``<images>/<name>.tar.gz`` with its digests beside it."""
    out = _root() / f"{name}.tar.gz"
    meta = _root() / f"{name}.json"
    if meta.exists() and out.exists():
        m = json.loads(meta.read_text())
        return Blob(out, m["digest"], m["diff_id"], m["size"])
    with (_root() / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if meta.exists() and out.exists():
            m = json.loads(meta.read_text())
            return Blob(out, m["digest"], m["diff_id"], m["size"])
        started = time.monotonic()
        print(f"building image layer {name} (once; cached in {_root()})", file=sys.stderr)
        blob = make(out)  # type: ignore[operator]
        meta.write_text(
            json.dumps({"digest": blob.digest, "diff_id": blob.diff_id, "size": blob.size})
        )
        print(f"built {name} in {time.monotonic() - started:.0f} s", file=sys.stderr)
        return blob  # type: ignore[no-any-return]


def _debootstrap_version() -> str:
    return (debs.unpacked("debootstrap") / ".version").read_text().strip()


def base_layer() -> Blob:
    """The Debian minbase + python3 (with pip, as the official image has) as one layer."""
    packages = ",".join(BASE_PACKAGES)
    key = hashlib.sha256(f"{SUITE} {_debootstrap_version()} {packages}".encode()).hexdigest()[:10]
    return _cached(f"python{python_version()}-{SUITE}-{key}", _make_base)


def _make_base(out: Path) -> Blob:
    tool = debs.unpacked("debootstrap")
    with tempfile.TemporaryDirectory(dir=_root()) as work:
        rootfs = Path(work) / "rootfs"
        result = subprocess.run(
            [
                str(tool / "usr" / "sbin" / "debootstrap"),
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(rootfs),
                MIRROR,
            ],
            env={**os.environ, "DEBOOTSTRAP_DIR": str(tool / "usr" / "share" / "debootstrap")},
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr}")
        found = subprocess.run(
            [str(rootfs / "usr" / "bin" / "python3"), "-c", "import sys; print(sys.version)"],
            capture_output=True,
            text=True,
        ).stdout
        if not found.startswith(python_version() + "."):
            raise RuntimeError(
                f"Debian {SUITE}'s python3 is {found.split()[0] if found else '?'}, but the "
                f"tests run Python {python_version()}: run them with the Python of {SUITE} "
                f"or change SUITE in {__file__}"
            )
        # What the official slim image has and the runner's command relies on.
        (rootfs / "usr" / "local" / "bin" / "python").symlink_to("/usr/bin/python3")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "debootstrap"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
            (rootfs / junk).mkdir(parents=True, exist_ok=True)
        # /dev is the runtime's: debootstrap's device nodes would only shadow it.
        shutil.rmtree(rootfs / "dev", ignore_errors=True)
        (rootfs / "dev").mkdir()
        tar_path = Path(work) / "layer.tar"
        subprocess.run(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tar_path), "."], check=True
        )
        return _layer(tar_path, out)


def pause_layer() -> Blob:
    busybox = debs.unpacked("busybox-static")
    version = (busybox / ".version").read_text().strip()
    key = hashlib.sha256(version.encode()).hexdigest()[:10]

    def make(out: Path) -> Blob:
        tar_path = out.with_suffix(".tmp")
        with tarfile.open(tar_path, "w") as tar:
            tar.add(busybox / "bin" / "busybox", arcname="bin/busybox")
        return _layer(tar_path, out)

    return _cached(f"pause-{key}", make)


def _runner_key() -> str:
    import cloudpickle

    digest = hashlib.sha256(f"{python_version()} {cloudpickle.__version__} pyc".encode())
    digest.update(base_layer().diff_id.encode())  # its /etc/passwd and group come from there
    for path in sorted(RUNNER_DIR.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(RUNNER_DIR)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _compile(root: Path) -> None:
    """Bytecode for every module under ``root``, recorded with its path in the image.

    Pods run as an unprivileged user who cannot write ``__pycache__`` into the image's
    root-owned site-packages: without this, every pod compiles everything it imports
    again (about a second more per pod start on this machine)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "-s",
            str(root),
            "-p",
            "/",
            str(root),
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"compiling the image's modules failed:\n{result.stdout[-3000:]}")


def runner_layer() -> Blob:
    return _cached(f"runner-py{python_version()}-{_runner_key()}", _make_runner)


def _make_runner(out: Path) -> Blob:
    import cloudpickle

    uv = shutil.which("uv")
    if uv is None:
        raise RuntimeError("building the runner image needs `uv` on PATH (pip install uv)")
    with tempfile.TemporaryDirectory(dir=_root()) as work:
        root = Path(work) / "root"
        site = root / "usr" / "local" / "lib" / f"python{python_version()}" / "dist-packages"
        result = subprocess.run(
            [
                uv,
                "pip",
                "install",
                "--quiet",
                "--no-cache",
                "--target",
                str(site),
                "--python-version",
                python_version(),
                "--python-platform",
                "x86_64-manylinux_2_36",
                f"{RUNNER_DIR}[s3,gcs,azure]",
                f"cloudpickle=={cloudpickle.__version__}",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"installing the runner failed:\n{result.stderr[-3000:]}")
        _compile(root)
        home = root / "home" / "ascend"
        home.mkdir(parents=True)
        base_etc = _base_etc()
        etc = root / "etc"
        etc.mkdir()
        passwd = (
            base_etc["passwd"]
            + f"ascend:x:{RUNNER_UID}:{RUNNER_UID}::/home/ascend:/usr/sbin/nologin\n"
        )
        group = base_etc["group"] + f"ascend:x:{RUNNER_UID}:\n"
        (etc / "passwd").write_text(passwd)
        (etc / "group").write_text(group)
        tar_path = Path(work) / "layer.tar"

        def owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
            if info.name.startswith("home/ascend"):
                info.uid = info.gid = RUNNER_UID
            else:
                info.uid = info.gid = 0
            info.uname = info.gname = ""
            return info

        with tarfile.open(tar_path, "w") as tar:
            for top in ("usr", "home", "etc"):
                tar.add(root / top, arcname=top, filter=owner)
        return _layer(tar_path, out)


# What the suite's own test functions import inside pods, copied from the test venv (the
# client's versions, no download): NumPy (the contract test_serialization's arrays) and
# ascend itself with its dependencies (nested calls: a remote function that makes remote
# calls). A user's image brings its own; the real runner image (runner/Dockerfile) has
# neither. Distributions the runner layer already has are left out.
TEST_PACKAGES = ("numpy", "ascend-k8s")
_RUNNER_DIST = "ascend-k8s-runner[s3,gcs,azure]"
SRC_DIR = Path(__file__).resolve().parents[2] / "src"


def _closure(*requirements: str) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions ``requirements`` need, themselves included."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency this venv does not have
        found[name] = dist
        for text in dist.requires or []:
            sub = Requirement(text)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return found


def _test_distributions() -> dict[str, importlib.metadata.Distribution]:
    wanted = _closure(*TEST_PACKAGES)
    for name in _closure(_RUNNER_DIST):
        wanted.pop(name, None)
    wanted.pop("ascend-k8s", None)  # installed editable: its own layer, from the sources
    return wanted


def test_packages_layer() -> Blob:
    """The dependencies in ``TEST_PACKAGES`` as installed in the test venv (cached by
    their versions)."""
    versions = " ".join(sorted(f"{n}=={d.version}" for n, d in _test_distributions().items()))
    key = hashlib.sha256(f"{python_version()} {versions} pyc".encode()).hexdigest()[:10]
    return _cached(f"testpkgs-py{python_version()}-{key}", _make_test_packages)


def ascend_layer() -> Blob:
    """ascend's own package from the sources under test (cached by their content)."""
    digest = hashlib.sha256(python_version().encode())
    for path in sorted((SRC_DIR / "ascend").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(SRC_DIR)).encode())
            digest.update(path.read_bytes())
    return _cached(f"ascend-py{python_version()}-{digest.hexdigest()[:12]}", _make_ascend)


def _site(root: Path) -> Path:
    return root / "usr" / "local" / "lib" / f"python{python_version()}" / "dist-packages"


def _tar_root_owned(root: Path, work: str, out: Path) -> Blob:
    _compile(root)
    tar_path = Path(work) / "layer.tar"

    def owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(tar_path, "w") as tar:
        tar.add(root / "usr", arcname="usr", filter=owner)
    return _layer(tar_path, out)


def _make_test_packages(out: Path) -> Blob:
    with tempfile.TemporaryDirectory(dir=_root()) as work:
        root = Path(work) / "root"
        site = _site(root)
        for dist in _test_distributions().values():
            for file in dist.files or []:
                if file.parts[0] == ".." or "__pycache__" in file.parts:
                    continue  # console scripts outside site-packages; bytecode (made below)
                source = Path(str(dist.locate_file(file)))
                if source.is_file():
                    target = site / file.as_posix()
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target)
        return _tar_root_owned(root, work, out)


def _make_ascend(out: Path) -> Blob:
    with tempfile.TemporaryDirectory(dir=_root()) as work:
        root = Path(work) / "root"
        site = _site(root)
        shutil.copytree(
            SRC_DIR / "ascend", site / "ascend", ignore=shutil.ignore_patterns("__pycache__")
        )
        dist = importlib.metadata.distribution("ascend-k8s")
        info = site / f"ascend_k8s-{dist.version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(dist.read_text("METADATA") or "")
        return _tar_root_owned(root, work, out)


def _base_etc() -> dict[str, str]:
    found: dict[str, str] = {}
    with tarfile.open(base_layer().path, "r:gz") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name in ("etc/passwd", "etc/group"):
                f = tar.extractfile(member)
                assert f is not None
                found[name.split("/")[1]] = f.read().decode()
            if len(found) == 2:
                break
    return found


def _config(layers: list[Blob], **config: object) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in layers]},
        },
        sort_keys=True,
    ).encode()


def images() -> dict[str, tuple[list[Blob], bytes]]:
    """Every image the suite serves: name -> (layers, config)."""
    from ascend.backends._kubernetes._spec import default_image

    base = base_layer()
    runner = runner_layer()
    packages = test_packages_layer()
    own = ascend_layer()
    pause = pause_layer()
    py = python_version()
    env = ["PATH=/usr/local/bin:/usr/bin:/bin", "PYTHONUNBUFFERED=1", "LANG=C.UTF-8"]
    base_config = _config([base], Env=env, Cmd=["python3"])
    runner_config = _config(
        [base, runner, packages, own],
        Env=env,
        User=str(RUNNER_UID),
        WorkingDir="/home/ascend",
        Entrypoint=["python", "-u", "-m", "ascend_runner"],
    )
    root_runner_config = _config(
        [base, runner, packages, own],
        Env=env,
        WorkingDir="/home/ascend",
        Entrypoint=["python", "-u", "-m", "ascend_runner"],
    )
    pause_config = _config([pause], Entrypoint=["/bin/busybox", "sleep", "infinity"])
    return {
        f"docker.io/library/python:{py}-slim": ([base], base_config),
        f"docker.io/library/python:{py}": ([base], base_config),
        default_image(): ([base, runner, packages, own], runner_config),
        # The same without its USER line: an image whose user is root.
        f"{default_image()}-root": ([base, runner, packages, own], root_runner_config),
        "registry.k8s.io/pause:3.10": ([pause], pause_config),
    }


def _repository(name: str) -> tuple[str, str]:
    """``registry/path:tag`` -> (``path``, ``tag``) as the registry mirror serves it."""
    without_registry = name.split("/", 1)[1]
    path, _, tag = without_registry.rpartition(":")
    return path, tag


def push_all(registry: str) -> dict[str, str]:
    """Push every image to ``registry`` (host:port, plain HTTP); returns name -> digest."""
    pushed = {}
    for name, (layers, config) in images().items():
        path, tag = _repository(name)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        for blob in layers:
            _push_blob(registry, path, blob.digest, blob.path.read_bytes, blob.size)
        _push_blob(registry, path, config_digest, lambda c=config: c, len(config))
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": b.digest,
                        "size": b.size,
                    }
                    for b in layers
                ],
            }
        ).encode()
        _request(
            "PUT",
            f"http://{registry}/v2/{path}/manifests/{tag}",
            manifest,
            {"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        pushed[name] = "sha256:" + hashlib.sha256(manifest).hexdigest()
    return pushed


def _request(
    method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        if method == "HEAD" and exc.code == 404:
            return 404, {}
        raise RuntimeError(f"registry {method} {url}: {exc.code} {exc.read()[:500]!r}") from exc


def _push_blob(registry: str, path: str, digest: str, read: object, size: int) -> None:
    status, _ = _request("HEAD", f"http://{registry}/v2/{path}/blobs/{digest}")
    if status == 200:
        return
    _, headers = _request("POST", f"http://{registry}/v2/{path}/blobs/uploads/")
    location = headers["Location"]
    if location.startswith("/"):
        location = f"http://{registry}{location}"
    separator = "&" if "?" in location else "?"
    data = read()  # type: ignore[operator]
    _request(
        "PUT",
        f"{location}{separator}digest={digest}",
        data,
        {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )


def main() -> None:
    for name, (layers, _) in images().items():
        print(name, [b.path.name for b in layers])


if __name__ == "__main__":
    main()
