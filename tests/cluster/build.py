"""Build (once) the control-plane binary from the Go module in ``tests/cluster/go``.

The binary is cached outside the repository, keyed by the Kubernetes version and a
hash of the Go module's files, so a change to the module rebuilds and an unchanged
module never does: ``~/.cache/ascend-testcluster/<version>-<hash>/bin/testcluster``
(``ASCEND_TESTCLUSTER_CACHE`` overrides the cache root).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

GO_MODULE = Path(__file__).parent / "go"


# Resolved once: tests point XDG_CACHE_HOME at temporary folders while they run.
_CACHE_ROOT = Path(
    os.environ.get("ASCEND_TESTCLUSTER_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ascend-testcluster"
)


def cache_root() -> Path:
    return _CACHE_ROOT


def kubernetes_version() -> str:
    match = re.search(r"^\s*k8s\.io/kubernetes (v\S+)$", (GO_MODULE / "go.mod").read_text(), re.M)
    if not match:
        raise RuntimeError(f"no k8s.io/kubernetes requirement in {GO_MODULE / 'go.mod'}")
    return match.group(1)


def _module_hash() -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((GO_MODULE / name).read_bytes())
    return digest.hexdigest()[:12]


def binary_path() -> Path:
    return cache_root() / f"{kubernetes_version()}-{_module_hash()}" / "bin" / "testcluster"


def build(*, quiet: bool = False) -> Path:
    """Return the binary, building it first if it is not cached (takes minutes, cold)."""
    target = binary_path()
    if target.exists():
        return target
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(
            "the test cluster is compiled from Go modules, but `go` is not on PATH. "
            "Install Go ≥ 1.26 (https://go.dev/dl/) or use `nox -s kind` with Docker."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / ".build.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test runs build once
        if target.exists():
            return target
        version = kubernetes_version()
        ldflags = " ".join(
            [
                "-s -w",
                f"-X k8s.io/component-base/version.gitVersion={version}",
                f"-X k8s.io/client-go/pkg/version.gitVersion={version}",
                f"-X k8s.io/component-base/version.gitMajor={version.split('.')[0][1:]}",
                f"-X k8s.io/component-base/version.gitMinor={version.split('.')[1]}",
            ]
        )
        env = {
            **os.environ,
            "GOTOOLCHAIN": "local",
            "CGO_ENABLED": "0",
            "GOFLAGS": "-mod=mod",
        }
        partial = target.with_suffix(".partial")
        if not quiet:
            print(
                f"building the test control plane (Kubernetes {version}) into {target}; "
                "a cold build takes a few minutes",
                file=sys.stderr,
                flush=True,
            )
        started = time.monotonic()
        result = subprocess.run(
            [go, "build", "-trimpath", "-ldflags", ldflags, "-o", str(partial), "."],
            cwd=GO_MODULE,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"building the test control plane failed (exit {result.returncode}):\n"
                f"{result.stdout[-4000:]}{result.stderr[-4000:]}"
            )
        partial.rename(target)
        if not quiet:
            print(f"built in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return target
