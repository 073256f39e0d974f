"""The magics in a real Jupyter kernel: tests/data/magics.ipynb runs under nbclient + ipykernel.

The notebook asserts its own values (a %%trace prediction, a %patch_sweep heatmap, a %%patch effect
equal to the sweep's cell); this test checks what the kernel sent back for the tagged cells.
"""
import pathlib
import re
import subprocess
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = pathlib.Path(__file__).parent / "data" / "magics.ipynb"
PACKAGE = str(pathlib.Path(__file__).resolve().parents[1] / "nnpatch")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WIDGET, PLOTLY = "application/vnd.jupyter.widget-view+json", "application/vnd.plotly.v1+json"


def ensure_kernelspec():
    from jupyter_client.kernelspec import KernelSpecManager
    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user"], check=True, timeout=60)


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    ensure_kernelspec()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=180, startup_timeout=90,
                                     resources={"metadata": {"path": str(tmp_path_factory.mktemp("nb"))}})
    client.execute()  # a failing assert in a cell that is not tagged raises-exception fails here
    return nb


@pytest.fixture(scope="module")
def executed(notebook):
    return {tag: cell for cell in notebook.cells for tag in cell.metadata.get("tags", [])}


def test_sweep_cell_shows_a_plotly_heatmap_and_returns_the_result(executed):
    outputs = executed["sweep"].outputs
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)
    result = [o for o in outputs if o.output_type == "execute_result"]
    assert result and result[0].data["text/plain"].startswith("PatchingResult(activation patching of resid_pre")


def test_sweep_progress_is_text_and_no_cell_leaves_a_widget(executed, notebook):
    streams = "".join(o.get("text", "") for o in executed["sweep"].outputs if o.output_type == "stream")
    assert "patching resid_pre" in streams and "100%" in streams  # tqdm's text bar, kept as text
    for cell in notebook.cells:  # a saved widget reopens as "Error displaying widget: model not found"
        for o in cell.get("outputs", []):
            assert WIDGET not in o.get("data", {}), cell.source


def test_nnpatch_figures_display_without_logo_or_cloud_button(executed):
    (fig,) = [o.data[PLOTLY] for o in executed["sweep"].outputs if PLOTLY in o.get("data", {})]
    assert fig["config"]["displaylogo"] is False and "sendDataToCloud" in fig["config"]["modeBarButtonsToRemove"]
    assert fig["layout"]["autosize"] is True and "width" not in fig["layout"]


def test_bundled_models_load_without_a_loading_bar(executed):
    text = "".join(o.get("text", "") for o in executed["load"].outputs)
    assert "Loading weights" not in text and "%|" not in text


def test_patch_cell_shows_the_scores(executed):
    result = [o for o in executed["patch"].outputs if o.output_type == "execute_result"]
    assert result and re.match(r"PatchEffect\(logit_diff: clean [\d.]+, corrupt -[\d.]+, patched [\d.]+; effect 1\.0",
                               result[0].data["text/plain"])


def test_error_in_a_cell_shows_the_cell_line_not_nnpatch(executed):
    errors = [o for o in executed["cell-error"].outputs if o.output_type == "error"]
    assert errors and errors[0].ename == "AttributeError"
    text = ANSI.sub("", "\n".join(errors[0].traceback))
    assert f"Cell In[{executed['cell-error'].execution_count}], line 3" in text and "h.no_such_attribute" in text
    assert PACKAGE not in text and "tracing.py" not in text and "run_cell_magic" not in text


def test_wrong_shape_patch_names_the_module_and_shapes_at_the_cell_line(executed):
    cell = executed["patch-error"]
    (error,) = [o for o in cell.outputs if o.output_type == "error"]
    assert error.ename == "NNPatchValueError"
    assert error.evalue.startswith("cannot set transformer.h.2.input[:, -1]: it has shape (8, 128), the new "
                                   "value has shape (8, 3);")
    text = ANSI.sub("", "\n".join(error.traceback))
    assert f"Cell In[{cell.execution_count}], line 3" in text
    assert "      1 %%patch model --clean pairs\n      2 x = 1\n----> 3 model.transformer.h[2].input" in text
    for generated in ("__nnpatch", "tracer.invoke", "run_cell_magic", PACKAGE):
        assert generated not in text, generated


def test_usage_error_is_one_line(executed):
    outputs = executed["usage-error"].outputs
    text = ANSI.sub("", "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
                    + "\n".join(line for o in outputs if o.output_type == "error" for line in o.traceback))
    assert "UsageError: no model named 'modl' in the notebook; did you mean 'model'?" in text
    assert "Traceback" not in text and PACKAGE not in text
