"""docs/tutorial.ipynb runs from top to bottom (each cell as a reader would run it, in a fresh kernel)."""

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_tutorial_notebook_runs(tmp_path):
    for module in ("nbclient", "nbformat", "ipykernel"):
        pytest.importorskip(module, reason=f"{module} is not installed: the tutorial needs Jupyter "
                                           "(pip install -e '.[test]' installs it)")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "docs" / "tutorial.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "bayes" in printed and "share of the way" in printed
    assert any("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", [])), "no figure"
