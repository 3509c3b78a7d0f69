"""What a remote function asks for: resources, limits and environment."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from ascend._config import BACKENDS
from ascend._errors import ConfigError

_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P|e\d+)?$")
_MEMORY_UNITS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}
_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def memory_bytes(value: str) -> int:
    """Bytes in a Kubernetes memory quantity such as ``"16Gi"`` or ``"512M"``."""
    match = _MEMORY.match(value.strip())
    if not match:
        raise ConfigError(
            f"memory={value!r} is not a memory quantity. Fix: use a number of bytes with an "
            "optional suffix, e.g. '512Mi', '16Gi' or '2G'."
        )
    number, unit = match.groups()
    if unit and unit.startswith("e"):
        return int(float(number) * 10 ** int(unit[1:]))
    return int(float(number) * _MEMORY_UNITS[unit])


def _cpu(value: float | int | str) -> str:
    if isinstance(value, bool):
        raise ConfigError(f"cpu={value!r} must be a number of cores or a quantity like '500m'.")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"cpu={value!r} must be a positive number of cores.")
        return f"{value:g}"
    match = _CPU.match(str(value).strip())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(
            f"cpu={value!r} is not a CPU quantity. Fix: use a number of cores (2, 0.5) or "
            "millicores ('500m')."
        )
    return str(value).strip()


_GPU_SPEC = re.compile(r"^([A-Za-z0-9][A-Za-z0-9 ._-]*?)(?::(\d+))?$")


@dataclass(frozen=True)
class GpuChoice:
    """One acceptable GPU: ``count`` GPUs of ``product`` (``None``: any product)."""

    product: str | None
    count: int

    def __str__(self) -> str:
        if self.product is None:
            return f"{self.count} GPU{'s' if self.count != 1 else ''}"
        return f"{self.product}:{self.count}" if self.count != 1 else self.product


def _gpu(value: Any) -> int | str | tuple[str, ...]:
    """Validate ``gpu=``: a count, ``"H100"``, ``"A100-80GB:2"`` or a fallback list."""
    if isinstance(value, bool):
        raise ConfigError(
            f"gpu={value!r} must be a whole number of GPUs, a GPU model such as 'H100' or "
            "'A100-80GB:2', or a list of models in order of preference."
        )
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"gpu={value!r} must be a whole number of GPUs (0 or more).")
        return value
    choices = [value] if isinstance(value, str) else value
    if not isinstance(choices, list | tuple) or not choices:
        raise ConfigError(
            f"gpu={value!r} must be a whole number of GPUs, a GPU model such as 'H100' or "
            "'A100-80GB:2', or a non-empty list of models in order of preference."
        )
    out = []
    for choice in choices:
        match = _GPU_SPEC.match(choice.strip()) if isinstance(choice, str) else None
        if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
            raise ConfigError(
                f"gpu={choice!r} is not a GPU model. Fix: write a model with an optional count, "
                "e.g. 'H100', 'A100-80GB' or 'A100-80GB:2' (at least 1 GPU)."
            )
        out.append(choice.strip())
    return out[0] if isinstance(value, str) else tuple(out)


@dataclass(frozen=True)
class Resources:
    """Per-function options of :func:`ascend.remote`. All validated on construction."""

    gpu: int | str | tuple[str, ...] = 0
    """A number of GPUs of any model, ``"H100"``, ``"A100-80GB:2"`` (model and count), or
    a tuple of such models in order of preference (the first one the cluster has)."""
    gpu_memory: str | None = None
    """At least this much memory per GPU (a quantity, e.g. ``"40Gi"``)."""
    cpu: str | None = None
    memory: str | None = None
    timeout: float | None = None
    retries: int = 0
    requirements: tuple[str, ...] = ()
    image: str | None = None
    base_image: str | None = None
    node_type: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    backend: str | None = None
    max_preemptions: int = 3
    """Times a call (or map item) may be taken off its node by the cluster (preemption,
    eviction, drain, node loss) and run again, not counting against ``retries``."""

    @property
    def gpu_choices(self) -> tuple[GpuChoice, ...]:
        """The GPUs asked for, in order of preference (empty: no GPU)."""
        if isinstance(self.gpu, int):
            return (GpuChoice(None, self.gpu),) if self.gpu else ()
        out = []
        for spec in (self.gpu,) if isinstance(self.gpu, str) else self.gpu:
            match = _GPU_SPEC.match(spec)
            assert match is not None  # validated in build()
            out.append(GpuChoice(match.group(1).strip(), int(match.group(2) or 1)))
        return tuple(out)

    @property
    def gpu_count(self) -> int:
        """GPUs per call of the first choice (0: none)."""
        choices = self.gpu_choices
        return choices[0].count if choices else 0

    def describe_placement(self) -> str:
        """The GPU and node options, as a user wrote them, for messages."""
        parts = [f"gpu={self.gpu!r}" if self.gpu else "no GPU"]
        if self.gpu_memory:
            parts.append(f"gpu_memory={self.gpu_memory!r}")
        if self.node_type:
            parts.append(f"node_type={self.node_type!r}")
        return ", ".join(parts)

    def __post_init__(self) -> None:
        # Validated whichever way it is made: Resources(...), build() or replace().
        values = _validated({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def build(cls, **options: Any) -> Resources:
        """Validate user-facing option values and normalise them.

        Raises:
            ConfigError: an unknown option name, or a value out of range, naming the fix.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        for name in options:
            if name not in known:
                raise ConfigError(
                    f"unknown option {name!r}. Fix: use one of {', '.join(sorted(known))}."
                )
        return cls(**options)

    def replace(self, **overrides: Any) -> Resources:
        """A copy with some options changed, validated again."""
        merged = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        merged.update(overrides)
        return Resources.build(**merged)

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu": list(self.gpu) if isinstance(self.gpu, tuple) else self.gpu,
            "gpu_memory": self.gpu_memory,
            "max_preemptions": self.max_preemptions,
            "cpu": self.cpu,
            "memory": self.memory,
            "timeout": self.timeout,
            "retries": self.retries,
            "requirements": list(self.requirements),
            "image": self.image,
            "base_image": self.base_image,
            "node_type": self.node_type,
            "env": sorted(self.env),  # names only: values may be sensitive
        }


def _validated(options: dict[str, Any]) -> dict[str, Any]:
    """The option values checked and normalised; raises ConfigError naming the fix."""
    values = dict(options)
    values["gpu"] = _gpu(values.get("gpu", 0))
    gpu_memory = values.get("gpu_memory")
    if gpu_memory is not None:
        if not isinstance(gpu_memory, str):
            raise ConfigError(f"gpu_memory={gpu_memory!r} must be a string such as '40Gi'.")
        memory_bytes(gpu_memory)
        if not values["gpu"]:
            raise ConfigError(
                f"gpu_memory={gpu_memory!r} needs a GPU. Fix: add gpu=1 (or a model)."
            )
    preemptions = values.get("max_preemptions", 3)
    if isinstance(preemptions, bool) or not isinstance(preemptions, int) or preemptions < 0:
        raise ConfigError(f"max_preemptions={preemptions!r} must be a whole number (0 or more).")
    if values.get("cpu") is not None:
        values["cpu"] = _cpu(values["cpu"])
    if values.get("memory") is not None:
        if not isinstance(values["memory"], str):
            raise ConfigError(f"memory={values['memory']!r} must be a string such as '16Gi'.")
        memory_bytes(values["memory"])
    timeout = values.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ConfigError(f"timeout={timeout!r} must be a positive number of seconds.")
    retries = values.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"retries={retries!r} must be a whole number (0 or more).")
    values["requirements"] = _requirements(values.get("requirements", ()))
    env = values.get("env") or {}
    if not isinstance(env, Mapping) or not all(
        isinstance(k, str) and _ENV_NAME.match(k) and isinstance(v, str) for k, v in env.items()
    ):
        raise ConfigError(
            f"env must map variable names (letters, digits, '_') to string values, not {env!r}."
        )
    values["env"] = dict(env)
    backend = values.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is unknown. Fix: use one of {', '.join(BACKENDS)}.")
    for name in ("image", "base_image", "node_type"):
        value = values.get(name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{name}={value!r} must be a non-empty string.")
    return values


_REQUIREMENT_FILES = ("requirements.txt", "pyproject.toml", "uv.lock")


def _requirements_file(value: str | os.PathLike[str]) -> str:
    """``-r /absolute/path``: the file is read when a call is submitted."""
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"requirements={str(value)!r} is neither a list of requirements nor an existing "
            "file (no such file). Fix: pass a list, e.g. ['torch==2.6'], or the path of a "
            "requirements.txt, pyproject.toml or uv.lock."
        )
    return f"-r {path}"


def _requirements(value: Any) -> tuple[str, ...]:
    if isinstance(value, str | os.PathLike):
        return (_requirements_file(value),)
    if not isinstance(value, Sequence):
        raise ConfigError(
            f"requirements={value!r} must be a list of requirement strings, e.g. ['torch==2.6'], "
            "or the path of a requirements.txt, pyproject.toml or uv.lock."
        )
    out = []
    for item in value:
        if isinstance(item, str) and item.startswith(("-r ", "-r\t")):
            out.append(_requirements_file(item[3:].strip()))
            continue
        try:
            out.append(str(Requirement(item)))
        except (InvalidRequirement, TypeError) as exc:
            raise ConfigError(
                f"requirement {item!r} is not a valid requirement specifier: {exc}. Fix: use "
                "the pip syntax, e.g. 'torch==2.6' or 'numpy>=2'."
            ) from exc
    return tuple(out)
