"""notebooks/dead_tokens.ipynb cannot rot: it is executed top to bottom on a small sweep (through
nbclient and a real Jupyter kernel), and it is kept in the repository without outputs."""

import json
import re

import pytest

from runner.cli import main

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "dead_tokens.ipynb"
SMOKE = REPO / "experiments" / "smoke.yaml"


def test_the_notebook_is_kept_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    source = "".join("".join(c["source"]) for c in code)
    assert "from runner import " in source and "runner." not in source.replace("from runner import ", "")
    # Jupyter runs a notebook in its own folder: the default input is the repository's runs/plateau_sweep
    (default,) = re.findall(r'"LILGATSBY_NOTEBOOK_RUNS", "([^"]+)"', source)
    assert (NOTEBOOK.parent / default).resolve() == REPO / "runs" / "plateau_sweep"


@pytest.mark.slow  # trains 4 short runs, starts a kernel that imports torch
def test_the_notebook_runs_top_to_bottom_on_a_small_sweep(tmp_path, small_book, monkeypatch, capsys):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    for seed in (1, 2):  # the smoke sweep's grid, in both formats
        for precision, fmt in (("bf16-true", "compact"), ("fp32", "full")):
            assert main(["train", str(SMOKE), "--runs", str(tmp_path / "runs"), "--corpus", str(small_book),
                         "--set", f"train.seed={seed}", "--set", f"train.precision={precision}",
                         "--set", f"record.format={fmt}", "--quiet"]) == 0
    monkeypatch.setenv("LILGATSBY_NOTEBOOK_RUNS", str(tmp_path / "runs" / "smoke"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on any cell's error
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 4, f"{len(figures)} figures"  # norms, each dead token, Adam, the comparison
    text = "".join(o.get("text", "") for o in outputs)
    assert "dead tokens:" in text
