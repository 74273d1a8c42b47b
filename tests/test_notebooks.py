"""Every notebook in examples/ runs from top to bottom without an error (on tiny models),
so the examples never rot. The tokenizer notebooks share one work folder, in order."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ORDER = ["quickstart", "train_tokenizer", "inspect_tokens"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("examples")


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in EXAMPLES.glob("*.ipynb")) == sorted(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_notebook_runs(name, work, monkeypatch):
    monkeypatch.setenv("COSY_EXAMPLES_WORK", str(work))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # each notebook shows something: printed text, and a figure where it plots one
    assert any(o.output_type == "stream" or "text/markdown" in o.get("data", {}) for o in outputs)
    if name != "train_tokenizer":
        assert any("image/png" in o.get("data", {}) for o in outputs)
