"""A real Jupyter kernel: top-level ``await`` on ascend futures, executed with nbclient."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

CELLS = [
    "import ascend\nascend.configure(stream_logs=True, progress=False)",
    "@ascend.remote\ndef add(a, b):\n    print('adding', a, b)\n    return a + b",
    "value = await add(2, 3)\nvalue",
    "results = await add.map([1, 2, 3], [10, 20, 30])\nresults",
    "import asyncio\npair = await asyncio.gather(add(1, 1), add(2, 2))\npair",
    "add(4, 4).result()",
]


@pytest.mark.slow
def test_top_level_await_works_in_a_jupyter_kernel() -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    NotebookClient(nb, kernel_name="python3", timeout=180).execute()

    def result_of(index: int) -> str:
        outputs = [o for o in nb.cells[index].outputs if o.output_type == "execute_result"]
        assert outputs, f"cell {index} produced no result: {nb.cells[index].outputs}"
        return str(outputs[0]["data"]["text/plain"])

    assert result_of(2) == "5"
    assert result_of(3) == "[11, 22, 33]"
    assert result_of(4) == "[2, 4]"
    assert result_of(5) == "8"
    streamed = "".join(o.get("text", "") for o in nb.cells[2].outputs if o.output_type == "stream")
    assert "adding 2 3" in streamed, "remote output is shown in the cell"
