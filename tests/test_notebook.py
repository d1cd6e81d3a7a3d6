"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel and does what it says."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

# A kernel of its own imports torch afresh and runs the notebook: about 18 s, in `make test-all`.
pytestmark = pytest.mark.slow

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def kernel_manager(tmp_path: Path):
    """A manager for a "python3" kernel that runs this very interpreter.

    The kernelspec is written into tmp_path and is the only one the manager looks at, so that a
    user's or system's own "python3" kernelspec (another Python without trainlab) cannot win.
    """
    from ipykernel.kernelspec import install
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    prefix = tmp_path / "jupyter"
    install(kernel_name="python3", prefix=str(prefix))  # argv[0] is sys.executable
    specs = KernelSpecManager(
        kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")], ensure_native_kernel=False
    )
    assert specs.get_kernel_spec("python3").argv[0] == sys.executable
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def outputs(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def stdout_text(nb) -> str:
    return "".join(
        out.text for out in outputs(nb) if out.output_type == "stream" and out.name == "stdout"
    )


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(notebook after execution, its log folder, the kernel's interpreter)."""
    tmp_path = tmp_path_factory.mktemp("notebook")
    log_dir = tmp_path / "logs"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable, end='')"))
    with pytest.MonkeyPatch.context() as mp:
        # The kernel inherits this environment; the notebook reads its log folder from it.
        mp.setenv("TRAINLAB_NOTEBOOK_LOGS", str(log_dir))
        mp.delenv("MPLBACKEND", raising=False)  # let ipykernel pick its inline backend
        client = nbclient.NotebookClient(
            nb,
            timeout=300,
            kernel_name="python3",
            km=kernel_manager(tmp_path),
            resources={"metadata": {"path": str(tmp_path)}},
        )
        client.execute()  # raises CellExecutionError if any cell raises
    interpreter = nb.cells.pop().outputs[0].text
    return nb, log_dir, interpreter


def test_committed_notebook_is_valid_and_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None


def test_kernel_runs_the_test_interpreter(executed):
    _, _, interpreter = executed
    assert Path(interpreter).resolve() == Path(sys.executable).resolve()


def test_no_cell_raised(executed):
    nb, _, _ = executed
    errors = [out for out in outputs(nb) if out.output_type == "error"]
    assert not errors, "\n".join(f"{e.ename}: {e.evalue}" for e in errors)


def test_prints_config_and_a_good_test_accuracy(executed):
    nb, _, _ = executed
    text = stdout_text(nb)
    assert "_target_: trainlab.nets.cnn.SmallCNN" in text and "max_epochs: 5" in text
    assert "status: finished" in text
    match = re.search(r"test/acc: ([0-9.]+)", text)
    assert match, text[-2000:]
    assert float(match.group(1)) > 0.9  # 5 epochs of the CNN reach about 0.99


def test_run_writes_curves_png_into_the_log_folder(executed):
    _, log_dir, _ = executed
    runs = list((log_dir / "runs").iterdir())
    assert len(runs) == 1, runs
    run_dir = runs[0]
    assert (run_dir / "metrics.json").is_file() and (run_dir / "metrics.csv").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    curves = run_dir / "curves.png"
    assert curves.is_file()
    data = curves.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_figures_are_shown_inline(executed):
    nb, _, _ = executed
    images = [out for out in outputs(nb) if "image/png" in out.get("data", {})]
    assert len(images) >= 2  # learning curves and predicted digits
