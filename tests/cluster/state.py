"""Where a background test cluster (``python -m tests.cluster up``) records itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.cluster.build import cache_root


def run_dir() -> Path:
    return cache_root() / "run"


def state_file() -> Path:
    return run_dir() / "state.json"


def kind_kubeconfig() -> Path:
    return run_dir() / "kind.kubeconfig"


def read() -> dict[str, Any] | None:
    try:
        return json.loads(state_file().read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def write(value: dict[str, Any]) -> None:
    run_dir().mkdir(parents=True, exist_ok=True)
    state_file().write_text(json.dumps(value, indent=2))
