"""Environment builds in bucket mode on the local backend: cold against warm.

A small requirement set (a tiny package plus the runner's cloudpickle and fsspec) and a
large one (NumPy, s3fs, cryptography and everything they need, repacked from the
benchmark's own venv) from a local wheel index, so the figures measure ascend and uv,
not the network:

- cold build: fresh storage and an empty uv cache (resolve, install, pack, store);
- cold build, warm uv cache: fresh storage only (what a second project pays);
- warm: the environment exists (one manifest read);
- a call's latency with a warm environment (bootstrap on an unpacked environment),
  against a call without requirements in the same run (the baseline).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import anyio

import ascend
from ascend import _config, _environments
from ascend._storage import Storage
from benchmarks._report import median_seconds, write
from tests.envindex import TEST_PACKAGE, repack_with_dependencies, wheel_index

COLD = 5
LARGE = ["numpy", "s3fs", "cryptography"]
COLD_LARGE = 3
WARM = 20
CALLS = 30


def uses_package() -> str:
    import ascend_envtest_pkg  # type: ignore[import-not-found]

    return str(ascend_envtest_pkg.VALUE)


def plain() -> int:
    return 1


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["XDG_CONFIG_HOME"] = str(root / "config")
        os.environ["XDG_CACHE_HOME"] = str(root / "cache")
        wheels = wheel_index(root / "wheels")
        base = dict(index_url="none", find_links=str(wheels), stream_logs=False, progress=False)

        repack_with_dependencies(LARGE, wheels)

        def build(
            storage: Path, uv_cache: Path, requirements: list[str] | None = None
        ) -> _environments.Environment:
            os.environ["UV_CACHE_DIR"] = str(uv_cache)
            settings = _config.resolve({**base, "storage": storage.as_uri()})
            spec = _environments.spec_for(
                settings, requirements or [TEST_PACKAGE], platform=_environments.HOST
            )
            store = Storage(settings.storage, {})
            return anyio.run(_environments.ensure, settings, spec, store)

        cold, cold_cached = [], []
        for i in range(COLD):
            start = time.perf_counter()
            env = build(root / f"cold-{i}", root / f"uv-cold-{i}")
            cold.append(time.perf_counter() - start)
            assert env.built
        for i in range(COLD):
            start = time.perf_counter()
            env = build(root / f"cached-{i}", root / "uv-cold-0")
            cold_cached.append(time.perf_counter() - start)
            assert env.built
        warm = median_seconds(lambda: build(root / "cached-0", root / "uv-cold-0"), WARM)
        large_cold, large_cached = [], []
        for i in range(COLD_LARGE):
            start = time.perf_counter()
            large = build(root / f"large-{i}", root / f"uv-large-{i}", LARGE)
            large_cold.append(time.perf_counter() - start)
            assert large.built
            start = time.perf_counter()
            assert build(root / f"large-cached-{i}", root / f"uv-large-{i}", LARGE).built
            large_cached.append(time.perf_counter() - start)
        large_warm = median_seconds(
            lambda: build(root / "large-0", root / "uv-large-0", LARGE), WARM
        )

        ascend.configure(**base, storage=(root / "calls").as_uri())
        with_env = ascend.remote(requirements=[TEST_PACKAGE])(uses_package)
        without = ascend.remote(plain)
        with_env().result()  # builds and unpacks once
        without().result()
        # Interleaved, so a load spike on this shared machine hits both alike.
        env_samples, plain_samples = [], []
        for _ in range(CALLS):
            for fn, samples in ((with_env, env_samples), (without, plain_samples)):
                start = time.perf_counter()
                fn().result()
                samples.append(time.perf_counter() - start)
        call_env = statistics.median(env_samples)
        call_plain = statistics.median(plain_samples)

    figures = {
        "cold_build_s": statistics.median(cold),
        "cold_build_warm_uv_cache_s": statistics.median(cold_cached),
        "warm_s": warm,
        "archive_bytes": env.size,
        "call_with_warm_env_s": call_env,
        "call_without_requirements_s": call_plain,
        "cold_over_warm": statistics.median(cold) / warm,
        "large_cold_build_s": statistics.median(large_cold),
        "large_cold_build_warm_uv_cache_s": statistics.median(large_cached),
        "large_warm_s": large_warm,
        "large_archive_bytes": large.size,
        "env_call_over_plain_call": call_env / call_plain,
    }
    table = [
        ("cold build (fresh storage, empty uv cache)", f"{figures['cold_build_s']:.2f} s", "-"),
        (
            "cold build, warm uv cache",
            f"{figures['cold_build_warm_uv_cache_s']:.2f} s",
            "-",
        ),
        (
            "warm (environment exists: nothing built)",
            f"{warm * 1000:.1f} ms ({figures['cold_over_warm']:.0f}x faster than cold)",
            "no build on a cache hit",
        ),
        ("archive size", f"{env.size / 1024:.0f} KiB", "-"),
        (
            f"large set ({', '.join(LARGE)} and their dependencies): cold build / warm uv "
            "cache / environment exists",
            f"{figures['large_cold_build_s']:.1f} s / "
            f"{figures['large_cold_build_warm_uv_cache_s']:.1f} s / {large_warm * 1000:.0f} ms",
            "no build on a cache hit",
        ),
        ("large set: archive size", f"{large.size / 2**20:.1f} MiB", "-"),
        (
            "call with a warm environment vs a call without requirements",
            f"{call_env * 1000:.0f} ms vs {call_plain * 1000:.0f} ms "
            f"({figures['env_call_over_plain_call']:.2f}x)",
            "close to 1x",
        ),
    ]
    figures.update(_registry_figures(table))
    write("envs", figures, table)


def _registry_figures(table: list[tuple[str, str, str]]) -> dict[str, float]:
    """Registry mode: bytes pushed when one small requirement changes on top of a large
    (here: 24 MiB of incompressible "GPU library") set."""
    from ascend import _registry
    from tests.cluster.stores import start_registry
    from tests.envindex import write_wheel
    from tests.integration.test_environments_registry import _push_base_image

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wheels = wheel_index(root / "wheels")
        heavy = {f"nvidia_bench/lib{i}.so": os.urandom(8 << 20) for i in range(3)}
        write_wheel(wheels, "nvidia-bench", "1.0", {**heavy, "nvidia_bench/__init__.py": b""})
        write_wheel(wheels, "small-bench", "1.0", {"small_bench/__init__.py": b"X = 1\n"})
        registry = start_registry(root / "registry")
        try:
            _push_base_image(registry, root)
            settings = _config.resolve({"index_url": "none", "find_links": str(wheels)})
            target = f"http://{registry.url}/envs"

            def push(reqs: list[str]) -> tuple[_registry.PushedImage, float]:
                spec = _environments.spec_for(settings, reqs, base_image="python:3.11-slim")
                start = time.perf_counter()
                pushed = anyio.run(_registry.ensure_image, spec, target)
                return pushed, time.perf_counter() - start

            first, cold = push([TEST_PACKAGE, "nvidia-bench"])
            _, warm = push([TEST_PACKAGE, "nvidia-bench"])
            changed, changed_s = push([TEST_PACKAGE, "nvidia-bench", "small-bench"])
        finally:
            registry.stop()
    total = sum(first.layer_bytes)
    figures = {
        "registry_cold_push_s": cold,
        "registry_warm_s": warm,
        "registry_image_layer_bytes": total,
        "registry_small_change_uploaded_bytes": changed.uploaded_bytes,
        "registry_small_change_s": changed_s,
    }
    table.append(
        (
            "registry mode: cold build + push / warm (tag exists)",
            f"{cold:.2f} s / {warm * 1000:.0f} ms",
            "-",
        )
    )
    table.append(
        (
            "registry mode: bytes pushed when one small requirement changes",
            f"{changed.uploaded_bytes / 1024:.0f} KiB of {total / 2**20:.1f} MiB "
            f"({changed.uploaded} blobs: the small layer and the config)",
            "only the small layer",
        )
    )
    return figures


if __name__ == "__main__":
    main()
