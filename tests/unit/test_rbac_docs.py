"""The Role in docs/kubernetes.md is the one ``ascend admin user add`` creates."""

from __future__ import annotations

import re
from pathlib import Path

from ascend._rbac import role_rules

DOC = Path(__file__).parents[2] / "docs" / "kubernetes.md"


def _parse(block: str) -> list[dict[str, list[str]]]:
    rules: list[dict[str, list[str]]] = []
    for line in block.splitlines():
        match = re.match(r"^-?\s*(apiGroups|resources|verbs): \[(.*)\]$", line.strip())
        if not match:
            continue
        if match.group(1) == "apiGroups":
            rules.append({})
        values = [v.strip().strip('"') for v in match.group(2).split(",")]
        rules[-1][match.group(1)] = values
    return rules


def test_the_documented_role_is_the_provisioned_role() -> None:
    text = DOC.read_text()
    block = text.split("kind: Role", 1)[1].split("```", 1)[0]
    assert _parse(block) == role_rules()
