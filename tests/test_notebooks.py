"""The example notebooks execute without error (nbclient, the python3 kernel of this interpreter)."""

from pathlib import Path

import nbformat
import pytest

from tests.utils import REAL_DATA

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


_NO_REAL_DATA = pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real data (../shared/data/real) not present")


@pytest.mark.notebooks
@pytest.mark.parametrize(
    "name",
    [
        "01_quickstart",
        "02_forward_model",
        "03_batch",
        pytest.param("04_real_data", marks=[pytest.mark.data, _NO_REAL_DATA]),
    ],
)
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDIFF_DATA_MIRROR", str(REAL_DATA))  # jaxdiff.datasets in the kernel reads the mirror
    monkeypatch.setenv("JAXDIFF_FIGURE_DIR", str(tmp_path))
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
