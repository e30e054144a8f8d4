"""Every notebook in examples/notebooks runs top to bottom in a fresh kernel and shows its plots.

Each notebook is executed with nbclient in a new Jupyter kernel (the venv's python, as
tests/test_readme.py does), with its logs and exports redirected to a temporary directory through
``LIT_POSTTRAIN_NOTEBOOK_OUTPUTS``. A cell error fails the test, and so does the learning-signal assert
each notebook's last cell makes.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "examples" / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
PLOT_CALLS = ("plot_metrics(", "plt.show()")


def _code(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebooks_exist():
    """The pipeline, reward-model, bring-your-own and per-method notebooks are all there."""
    names = {path.stem for path in NOTEBOOKS}
    assert {"01_sft_dpo_grpo", "02_reward_model_and_rl", "03_bring_your_own", "kto", "orpo", "cpo"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs_with_a_real_model_cell(path):
    """In git a notebook has no outputs (the test makes them), one cell to switch to a real model on a GPU,
    markdown that explains it, and a last cell that asserts."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    stored = [i for i, cell in enumerate(_code(notebook)) if cell.outputs or cell.execution_count is not None]
    assert not stored, f"{path.name}: code cells {stored} were stored with outputs; clear them before committing"
    switch = [cell for cell in _code(notebook) if "REAL_MODEL = False" in cell.source]
    assert len(switch) == 1 and 'accelerator="gpu"' in switch[0].source, f"{path.name}: no single real-model cell"
    assert sum(cell.cell_type == "markdown" for cell in notebook.cells) >= 4, f"{path.name}: too little explanation"
    assert "assert " in _code(notebook)[-1].source, f"{path.name}: the last cell asserts no learning signal"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_plots(path, tmp_path, monkeypatch):
    """Executed in a fresh kernel the notebook raises nothing (its last cell asserts the learning signal),
    writes only under the output directory it is given, and every plotting cell shows a PNG."""
    monkeypatch.setenv("LIT_POSTTRAIN_NOTEBOOK_OUTPUTS", str(tmp_path))
    default_out = ROOT / "outputs" / "notebooks" / path.stem  # where a user's run writes
    before = sorted(default_out.rglob("*")) if default_out.exists() else []
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})  # fmt: skip
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    errors = [o for cell in _code(notebook) for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors
    plot_cells = [cell for cell in _code(notebook) if any(call in cell.source for call in PLOT_CALLS)]
    assert plot_cells, f"{path.name}: no plot"
    for cell in plot_cells:
        images = [o for o in cell.outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
        assert images, f"{path.name}: this plotting cell shows no PNG:\n{cell.source[:300]}"
    assert (tmp_path / path.stem).is_dir(), f"{path.name}: wrote nothing under LIT_POSTTRAIN_NOTEBOOK_OUTPUTS"
    after = sorted(default_out.rglob("*")) if default_out.exists() else []
    assert after == before, f"{path.name}: wrote to {default_out} instead of LIT_POSTTRAIN_NOTEBOOK_OUTPUTS"
