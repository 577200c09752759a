"""Every notebook executes top to bottom in a Jupyter kernel (nbclient; the `python3` kernel of this Python).

A temporary copy is executed (the committed notebooks keep the outputs `scripts/notebooks.sh` saved); any
cell error fails the test with the cell's source and traceback. Each notebook has its own time limit. They
run on CPU, as in CI.
"""

import os
import pathlib
import shutil
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"quickstart", "architecture", "nvfp4", "training", "hf_checkpoints", "generation"}
# Whole-notebook limits, about 3x a quiet 2-core CI machine's time (they catch a hang or a notebook grown far
# too slow, not a busy machine); a single cell gets the same limit.
TIMEOUT_S = {"training": 600, "generation": 480}
DEFAULT_TIMEOUT_S = 240


def test_the_set_of_notebooks():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    assert any(c.cell_type == "code" for c in nb.cells), f"{path.name} has no code cells"
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    monkeypatch.setenv("MPLBACKEND", "agg")  # figures are drawn but not kept: this copy is thrown away
    limit = TIMEOUT_S.get(path.stem, DEFAULT_TIMEOUT_S)
    client = nbclient.NotebookClient(nb, timeout=limit, kernel_name="python3", record_timing=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed\n{e}", pytrace=False)
    except nbclient.exceptions.CellTimeoutError as e:
        pytest.fail(f"{path.name}: a cell ran past {limit}s\n{e}", pytrace=False)
    elapsed = time.perf_counter() - t0
    print(f"{path.name}: {elapsed:.1f}s")
    assert elapsed < limit, f"{path.name} took {elapsed:.0f}s, over its {limit}s limit"
