"""The example notebooks: committed clean, and every cell runs."""

import pathlib
import re
import sys

import keras
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from conftest import START_UP_NOTICE

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = [
    "quickstart.ipynb", "decay_schedules.ipynb", "posthoc_ema.ipynb"
]


class _ThisInterpreter(KernelSpecManager):
    """Starts every kernel with the interpreter running the tests.

    The installed `python3` kernel spec runs whatever `python` is first on
    the PATH, which need not be the virtual environment under test.
    """

    def get_kernel_spec(self, kernel_name):
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher",
                  "-f", "{connection_file}"],
            display_name="Python 3 (tests)",
            language="python",
        )


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(
        NOTEBOOKS
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [], cell.source
        assert cell.execution_count is None, cell.source


# Once, on TensorFlow: the notebooks call only public APIs that the rest of
# the suite tests on every backend, and three runs of every notebook would
# take minutes of CI's 30.
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the notebooks run once, on TensorFlow (CI time)",
)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_every_cell_without_error(name, tmp_path):
    before = sorted(NOTEBOOK_DIR.iterdir())
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(
        notebook,
        km=KernelManager(
            kernel_name="python3", kernel_spec_manager=_ThisInterpreter()
        ),
        timeout=300,
        # The kernel's working directory: the notebook's files go there.
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert errors == []
    # The kernel forwards what TensorFlow writes to file descriptor 2.
    stderr = "".join(o.text for c in code for o in c.outputs
                     if o.output_type == "stream" and o.name == "stderr")
    assert not re.search(START_UP_NOTICE, stderr), stderr
    assert sorted(NOTEBOOK_DIR.iterdir()) == before
    if name == "quickstart.ipynb":
        assert (tmp_path / "digits_ema.keras").is_file()
        assert (tmp_path / "digits_ema_plain.keras").is_file()
    if name == "posthoc_ema.ipynb":
        assert len(list((tmp_path / "snapshots").glob("*.npz"))) == 20
        assert (tmp_path / "posthoc_sweep.png").is_file()
