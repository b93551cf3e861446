"""docs/tutorial.ipynb runs from top to bottom in a fresh kernel, and shows what it says."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "tutorial.ipynb"


def test_tutorial_notebook_executes_and_shows_tables_and_figures(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A cell that raises fails the test (nbclient raises CellExecutionError).
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("evidence gap" in h and "<table>" in h for h in html)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "linear encoder" in text and "MLP encoder" in text
    assert "amortization gap" in "".join(
        o["data"].get("text/plain", "") for o in outputs if "data" in o)
