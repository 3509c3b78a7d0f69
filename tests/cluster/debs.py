"""Debian packages unpacked into the cache (``apt-get download`` + ``dpkg -x``).

Nothing is installed: no system service starts and nothing lands in ``/usr``. Each
package is unpacked once into ``<cache>/tools/debs/<package>/`` and reused.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.cluster.build import cache_root


def _root() -> Path:
    path = cache_root() / "tools" / "debs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def unpacked(package: str) -> Path:
    """The folder holding ``package``'s files (``<folder>/usr/bin/...``), unpacking it on
    first use. Raises ``RuntimeError`` if apt cannot download it."""
    folder = _root() / package
    done = folder / ".unpacked"
    if done.exists():
        return folder
    with (_root() / f".{package}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with tempfile.TemporaryDirectory(dir=_root()) as download_dir:
            result = _download(package, Path(download_dir))
            if result.returncode != 0:  # a bare machine may have no package lists yet
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
                result = _download(package, Path(download_dir))
            debs = list(Path(download_dir).glob(f"{package}_*.deb"))
            if result.returncode != 0 or not debs:
                raise RuntimeError(
                    f"`apt-get download {package}` failed (the test nodes need Debian's "
                    f"{package}): {result.stderr[-2000:]}"
                )
            subprocess.run(["dpkg", "-x", str(debs[0]), str(folder)], check=True)
            (folder / ".version").write_text(debs[0].name)
        done.touch()
    return folder


def _download(package: str, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", "download", package], cwd=folder, capture_output=True, text=True
    )
