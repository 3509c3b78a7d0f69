"""Contract: a call and a map return what the function returned, on every backend."""

from __future__ import annotations

import ascend


@ascend.remote
def _square(x: int) -> int:
    return x * x


def test_a_call_returns_the_functions_value(backend: str) -> None:
    assert _square(7).result(timeout=120) == 49


def test_a_map_returns_values_in_input_order(backend: str) -> None:
    assert _square.map([3, 1, 2]).result(timeout=120) == [9, 1, 4]
