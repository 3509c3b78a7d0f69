"""Build a function's environment inside a Kubernetes build Job, on a stock Python.

Standard library only: the build pod runs the base image's own ``python -c`` with this
source. ``ASCEND_BUILD`` (JSON) says what to do:

- ``pip``: the index options of ``python -m pip install --target <dir> <tools>``, so
  the build's tools come from the cluster's package index;
- ``tools``: the requirements of those tools: ``uv==X`` (left out when the image has
  ``uv`` on its PATH, or ``$ASCEND_UV`` names one), and ``oras==Y`` for an image;
- ``uv``: the ``uv pip install`` arguments (without target, requirements, constraints);
- ``requirements``, ``constraints``: the files' text;
- ``runner``: where to fetch the runner's source archive (path or HTTPS URL);
- ``failure``: where to publish a failure (path, presigned PUT URL, or null: none);
- archive mode: ``archive``, ``manifest``: where to publish (path or presigned PUT
  URL); ``manifest_body``: the manifest, completed here with the archive's sha256 and
  size. The archive is written before the manifest, so the manifest's presence means
  the environment exists;
- image mode: ``image`` (``registry``, ``key``, ``base_image``, ``base_digest``): the
  environment is layered and pushed by :mod:`ascend_runner._oci` (credentials from
  ``$DOCKER_CONFIG``), tagged with its key, so the tag's presence means it exists.

A failed build publishes ``failure`` (message, log tail) and exits 1. Every line of
pip's and uv's output is printed, so it reaches the client as pod logs.
"""

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO

ARCHIVE_MTIME = 0
TAIL = 40


# Where compiled bytecode says its sources are (an image's environment folder). The path
# is only recorded, never used: the import system puts the real one into the code it
# loads, so tracebacks name the file wherever the environment was unpacked.
BYTECODE_PREFIX = "/opt/ascend/env"


def deterministic_tar(folder: Path, *, bytecode: bool = False) -> bytes:
    """A byte-identical ``.tar.gz`` of ``folder`` for the same contents, in memory (see
    :func:`pack`)."""
    out = io.BytesIO()
    pack(folder, sorted_entries(folder, bytecode=bytecode), out)
    return out.getvalue()


def sorted_entries(folder: Path, *, bytecode: bool = False) -> list[str]:
    """Every file, link and folder under ``folder`` (relative POSIX paths, sorted),
    without bytecode unless ``bytecode`` (an environment's, from :func:`compile_bytecode`)."""
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if not bytecode and ("__pycache__" in rel.split("/") or rel.endswith(".pyc")):
            continue
        out.append(rel)
    return sorted(out)


def compile_bytecode(folder: Path, python: str = sys.executable) -> int:
    """Compile every module under ``folder`` with ``python`` (the target's interpreter),
    as unchecked-hash ``.pyc`` files: byte-identical for the same sources whenever and
    wherever they are compiled (no timestamps, recorded paths under
    :data:`BYTECODE_PREFIX`), and never checked against their sources, which do not
    change. Pods run as a user who cannot write ``__pycache__`` into an image or an
    unpacked environment: without this, every pod start compiles every module it
    imports again (seconds for large libraries). A module that does not compile (a
    Python 2 file in a package, say) is left to its source. Returns compileall's exit
    code (non-zero: some module did not compile)."""
    command = [python, "-m", "compileall", "-q", "-j", "0"]
    command += ["--invalidation-mode", "unchecked-hash"]
    command += ["-s", str(folder), "-p", BYTECODE_PREFIX, str(folder)]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return done.returncode


class _Counting:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, out: BinaryIO | gzip.GzipFile) -> None:
        self.out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def pack(folder: Path, entries: list[str], out: BinaryIO, prefix: str = "") -> tuple[str, str, int]:
    """Stream a deterministic ``tar+gzip`` of ``entries`` (relative to ``folder``) into
    ``out``, each stored under ``prefix`` (which gets folder entries of its own): sorted
    as given, mtimes 0, uid/gid 0 without names, modes 0644/0755, gzip without a name or
    time at a fixed level. Nothing is held in memory beyond a block.

    Returns the SHA-256 (hex) of the compressed bytes, of the uncompressed tar (an OCI
    layer's ``diff_id``), and the compressed size.
    """
    compressed = _Counting(out)
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=6, mtime=0) as gz:
        raw = _Counting(gz)
        with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]

            def header(name: str) -> tarfile.TarInfo:
                info = tarfile.TarInfo(name)
                info.mtime = ARCHIVE_MTIME
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                return info

            parts = [p for p in prefix.strip("/").split("/") if p]
            for depth in range(1, len(parts) + 1):
                info = header("/".join(parts[:depth]))
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            base = "/".join(parts)
            for rel in entries:
                path = folder / rel
                info = header(f"{base}/{rel}" if base else rel)
                if path.is_symlink():
                    info.type, info.mode = tarfile.SYMTYPE, 0o777
                    info.linkname = os.readlink(path)
                    tar.addfile(info)
                elif path.is_dir():
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    info.size = path.stat().st_size
                    info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                    with path.open("rb") as f:
                        tar.addfile(info, f)
    return compressed.sha256.hexdigest(), raw.sha256.hexdigest(), compressed.size


def _is_url(where: str) -> bool:
    return where.startswith(("http://", "https://"))


def _path(where: str) -> str:
    return where[len("file://") :] if where.startswith("file://") else where


def fetch(where: str) -> bytes:
    if _is_url(where):
        import urllib.request

        with urllib.request.urlopen(where, timeout=120) as response:  # noqa: S310 (http(s) only)
            data: bytes = response.read()
            return data
    return Path(_path(where)).read_bytes()


def publish(where: str, data: bytes | Path) -> None:
    """PUT to a presigned URL, or write a file aside and rename it into place. A ``Path``
    is streamed from its file."""
    if _is_url(where):
        import urllib.request

        # Not urllib's default form type: some stores would parse the body as a form.
        headers = {"Content-Type": "application/octet-stream"}
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        headers["Content-Length"] = str(size)
        for attempt in range(3):
            try:
                with contextlib.ExitStack() as stack:
                    body = stack.enter_context(data.open("rb")) if isinstance(data, Path) else data
                    request = urllib.request.Request(  # noqa: S310 (http(s) only)
                        where, data=body, method="PUT", headers=headers
                    )
                    stack.enter_context(urllib.request.urlopen(request, timeout=300))  # noqa: S310
                    return
            except OSError:
                if attempt == 2:
                    raise
                time.sleep(1 + 2 * attempt)
    path = Path(_path(where))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    if isinstance(data, Path):
        shutil.copyfile(data, staging)
    else:
        staging.write_bytes(data)
    os.replace(staging, path)


def run(command: list[str], tail: "deque[str]") -> int:
    """Run ``command``, printing and keeping each line of its output."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            print(line, flush=True)
        return process.wait()


def build(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Install, then pack and publish (archive mode) or layer and push (image mode);
    returns the manifest. Raises RuntimeError on failure."""
    tail: deque[str] = deque(maxlen=TAIL)
    # A base image that has uv (or $ASCEND_UV) is used as is; a stock one gets it by pip.
    uv = os.environ.get("ASCEND_UV") or shutil.which("uv")
    wanted = [t for t in spec["tools"] if not (uv and t.split("=")[0] == "uv")]
    tools = work / "tools"
    if wanted:
        pip = [sys.executable, "-m", "pip", "install", "--no-cache-dir"]
        pip += ["--disable-pip-version-check", "--target", str(tools), *spec["pip"], *wanted]
        if run(pip, tail) != 0:
            names = " and ".join(t.split("=")[0] for t in wanted)
            raise RuntimeError(f"installing {names} in the build pod failed\n" + "\n".join(tail))
    uv = uv or str(tools / "bin" / "uv")
    (work / "requirements.txt").write_text(spec["requirements"])
    (work / "constraints.txt").write_text(spec["constraints"])
    target = work / "env"
    command = [uv, "pip", "install", "--target", str(target)]
    command += ["--requirements", str(work / "requirements.txt")]
    command += ["--constraints", str(work / "constraints.txt"), *spec["uv"]]
    tail.clear()
    code = run(command, tail)
    if code != 0:
        raise RuntimeError(f"uv exited with code {code}\n" + "\n".join(tail))
    with tarfile.open(fileobj=io.BytesIO(fetch(spec["runner"])), mode="r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(target)  # noqa: S202 (our own archive, fetched by digest)
    compile_bytecode(target)  # this pod runs the base image's own Python: the target's
    if "image" in spec:
        return push_image(spec["image"], target, work, tools)
    archive = work / "env.tar.gz"
    with archive.open("wb") as out:
        digest, _, size = pack(target, sorted_entries(target, bytecode=True), out)
    publish(spec["archive"], archive)
    manifest = dict(spec["manifest_body"])
    manifest.update(sha256=digest, size=size, created=time.time())
    publish(spec["manifest"], json.dumps(manifest, indent=2, sort_keys=True).encode())
    print(f"ascend-build: published {digest} ({size} bytes)", flush=True)
    return manifest


def push_image(image: dict[str, Any], folder: Path, work: Path, tools: Path) -> dict[str, Any]:
    """Layer ``folder`` and push it as the environment's image (the runner's
    :mod:`ascend_runner._oci` from ``folder``, oras-py from ``tools``)."""
    sys.path[:0] = [str(folder), str(tools)]
    from ascend_runner import _oci

    try:
        session = _oci.Session(_oci.Target.parse(image["registry"]))
        pushed = _oci.push_environment(
            session,
            folder,
            work,
            base_image=image["base_image"],
            base_digest=image["base_digest"],
            key=image["key"],
            on_line=lambda line: print(f"ascend-build: {line}", flush=True),
        )
    except (_oci.RegistryError, _oci.RegistrySettingError) as exc:
        raise RuntimeError(f"pushing the image failed: {exc}") from exc
    print(f"ascend-build: pushed {pushed.ref} ({pushed.uploaded} blobs uploaded)", flush=True)
    return {"image": pushed.ref}


def main() -> None:
    spec = json.loads(os.environ["ASCEND_BUILD"])
    work = Path(tempfile.mkdtemp(prefix="ascend-build-"))
    try:
        build(spec, work)
    except Exception as exc:
        text = str(exc)
        message, _, log = text.partition("\n")
        print(f"ascend-build: failed: {message}", flush=True)
        body = {"message": message, "requirement": None, "log": log or text}
        try:
            if spec.get("failure"):
                publish(spec["failure"], json.dumps(body).encode())
        except Exception as publish_error:
            print(f"ascend-build: cannot publish the failure: {publish_error!r}", flush=True)
        sys.exit(1)
    finally:  # a build pod's folder goes with its container, but not on a laptop
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
