"""The tutorial notebooks run top to bottom in a fresh python3 kernel.

Each notebook asserts its own findings in its cells (numbers checked against plain-PyTorch hooks
and against the sweeps), so executing it without an error is the test. Runtimes are reported as
test properties and on stdout (`pytest -s`), never asserted; nbclient's per-cell timeout only
stops a hung kernel.
"""
import pathlib
import subprocess
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

FOLDER = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
CELL_TIMEOUT_S = 180
EXPECTED = ["01_quickstart.ipynb", "02_activation_patching.ipynb", "03_attribution_patching.ipynb",
            "04_patching_across_invokes.ipynb", "05_workbench_and_magics.ipynb",
            "06_generation_and_steering.ipynb", "07_circuits.ipynb"]


@pytest.fixture(scope="module")
def kernel_name():
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"],
                       check=True, capture_output=True)
    return "python3"


def test_the_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


def test_readme_lists_every_notebook():
    readme = (FOLDER / "README.md").read_text()
    missing = [p.name for p in NOTEBOOKS if p.name not in readme]
    assert not missing, f"notebooks/README.md does not list {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    with_outputs = [i for i, c in enumerate(nb.cells)
                    if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not with_outputs, (
        f"{path.name}: cells {with_outputs} carry outputs; clear them before committing "
        f"(jupyter nbconvert --clear-output --inplace {path.relative_to(FOLDER.parent)})")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, kernel_name, record_property):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name,
                                     resources={"metadata": {"path": str(FOLDER)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    seconds = time.perf_counter() - start
    record_property("seconds", round(seconds, 1))
    print(f"{path.name}: {seconds:.1f} s")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
