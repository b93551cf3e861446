"""docs/tutorial.ipynb runs from top to bottom in a fresh kernel, and shows what it says."""

from __future__ import annotations

import subprocess
import sys
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
    # The README's line, d.plot_kl_per_dim(); d.plot_khat(), shows both figures, once each.
    (plots,) = [c for c in nb.cells if "d.plot_kl_per_dim(); d.plot_khat()" in c.source]
    assert sum("image/png" in o.get("data", {}) for o in plots.outputs) == 2
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    # Importing elbogap prints nothing (tqdm.auto's "IProgress not found" without ipywidgets).
    assert "IProgress" not in text and "Warning" not in text, text
    assert "linear encoder" in text and "MLP encoder" in text
    assert "amortization gap" in "".join(
        o["data"].get("text/plain", "") for o in outputs if "data" in o)


def test_the_tutorial_fits_a_bernoulli_vae_to_the_binary_digits():
    """The digits are 0/1: the tutorial's model scores them with a Bernoulli, not a Gaussian,
    and calls them what they are."""
    from elbogap import load_dataset

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    words = "\n".join(c.source for c in nb.cells)
    assert 'pyro.sample("x", dist.Bernoulli(logits=' in code
    assert "dist.Normal(loc, scale).to_event(1), obs=x" not in code
    assert "grey level" not in words
    train = load_dataset("digits").train
    assert ((train == 0) | (train == 1)).all()


def test_importing_elbogap_in_a_kernel_without_ipywidgets_prints_nothing():
    """tqdm.auto warns "IProgress not found" on import where Jupyter runs but ipywidgets is
    missing; it reads "Jupyter runs" off ipykernel's shell module, which this imports.  Pyro
    imports tqdm.auto too: imported after elbogap, it stays quiet as well."""
    code = "import ipykernel.zmqshell, IPython\nimport elbogap\nimport pyro\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout == "" and result.stderr == "", result.stderr
