"""What a remote function asks for: resources, limits and environment."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Resources:
    """Per-function options of :func:`ascend.remote`. All validated on construction."""

    gpu: int = 0
    cpu: str | None = None
    memory: str | None = None
    timeout: float | None = None
    retries: int = 0
    requirements: tuple[str, ...] = ()
    image: str | None = None
    node_type: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    backend: str | None = None

    @classmethod
    def build(cls, **options: Any) -> Resources:
        """Validate user-facing option values and normalise them."""
        known = {f.name for f in dataclasses.fields(cls)}
        for name in options:
            if name not in known:
                raise ConfigError(
                    f"unknown option {name!r}. Fix: use one of {', '.join(sorted(known))}."
                )
        values = dict(options)
        gpu = values.get("gpu", 0)
        if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
            raise ConfigError(f"gpu={gpu!r} must be a whole number of GPUs (0 or more).")
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
            raise ConfigError(
                f"backend={backend!r} is unknown. Fix: use one of {', '.join(BACKENDS)}."
            )
        for name in ("image", "node_type"):
            value = values.get(name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name}={value!r} must be a non-empty string.")
        return cls(**values)

    def replace(self, **overrides: Any) -> Resources:
        """A copy with some options changed, validated again."""
        merged = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        merged.update(overrides)
        return Resources.build(**merged)

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "cpu": self.cpu,
            "memory": self.memory,
            "timeout": self.timeout,
            "retries": self.retries,
            "requirements": list(self.requirements),
            "image": self.image,
            "node_type": self.node_type,
            "env": sorted(self.env),  # names only: values may be sensitive
        }


def _requirements(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(
            f"requirements={value!r} must be a list of requirement strings, e.g. ['torch==2.6']."
        )
    out = []
    for item in value:
        try:
            out.append(str(Requirement(item)))
        except (InvalidRequirement, TypeError) as exc:
            raise ConfigError(
                f"requirement {item!r} is not a valid requirement specifier: {exc}. Fix: use "
                "the pip syntax, e.g. 'torch==2.6' or 'numpy>=2'."
            ) from exc
    return tuple(out)
