"""A map's progress bar in a real Jupyter kernel that has no ipywidgets."""

from __future__ import annotations

import importlib.util

import nbformat
import pytest
from nbclient import NotebookClient

CELLS = [
    "import ascend\nascend.configure(stream_logs=True)",
    "@ascend.remote\ndef add(a, b):\n    print('adding', a, b)\n    return a + b",
    "add.map([1, 2, 3], [10, 20, 30], progress=True).result()",
]


@pytest.mark.slow
def test_the_progress_bar_falls_back_to_text_without_a_warning_in_the_cell() -> None:
    assert importlib.util.find_spec("ipywidgets") is None, "this test needs no ipywidgets"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    NotebookClient(nb, kernel_name="python3", timeout=180).execute()
    outputs = nb.cells[2].outputs
    results = [o for o in outputs if o.output_type == "execute_result"]
    assert results and results[0]["data"]["text/plain"] == "[11, 22, 33]"
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "Warning" not in stderr, stderr
    assert "3/3" in stderr, "the text bar is shown"
