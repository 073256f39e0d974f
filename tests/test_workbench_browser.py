"""The workbench in a real browser: JupyterLab 4 headless, Debian's chromium driven by Playwright.

The test opens tests/data/workbench.ipynb (a Workbench on the bundled ioi model), clicks Run,
clicks a heatmap cell, selects two cells and patches them together, shows the code, and checks
that every number the page shows equals what nnpatch's Python API computes in this process.
Then it feeds the app bad input and checks that it answers with a message, not a traceback, and
still runs. Screenshots go to out/screenshots/.

Needs chromium (`apt-get install -y chromium`), playwright and jupyterlab (the `test` extra).
Without them the test fails in CI (CI=true) and is skipped elsewhere; scripts/test.sh installs them.
"""
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import nnpatch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(__file__).parent / "data" / "workbench.ipynb"
SCREENSHOTS = ROOT / "out" / "screenshots"
PAIR = nnpatch.tasks.ioi(4, seed=1, template=0)[0]  # the notebook's first example
INSPECT = (0, PAIR.meta["s2"])  # the second mention of S, where clean and corrupt differ
SELECT = [(1, PAIR.meta["s2"]), (3, PAIR.meta["end"])]
WAIT_MS = 60_000  # every wait on the page is bounded by this
TOL = 1e-4


def _needs():
    """Chromium and the Playwright driver, or skip (fail in CI) saying what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    missing = [] if chromium else ["chromium (apt-get install -y chromium)"]
    missing += [f"{m} (pip install '.[test]')" for m in ("playwright", "jupyterlab") if importlib.util.find_spec(m) is None]
    if missing:
        why = "the browser test needs " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(why + "; scripts/test.sh installs them (apt-get, as root)")
        pytest.skip(why)
    return chromium


@contextlib.contextmanager
def jupyterlab(root: Path):
    """A headless JupyterLab serving `root` on a free 127.0.0.1 port, with a random token."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    home = Path(tempfile.mkdtemp(prefix="nnpatch-lab-"))
    # No news or update pop-ups over the page (the network is closed anyway).
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               # One torch thread in the kernel: on a shared CI machine more threads only spin.
               OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True"]  # lets the test run notebook commands
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    log = open(home / "lab.log", "w")
    server = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (home / "lab.log").read_text()[-3000:])
                time.sleep(0.25)
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


KERNEL_IDLE = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return !!kernel && kernel.connectionStatus === "connected" && kernel.status === "idle";
}"""

SHAPES = ".nnpatch-workbench .js-plotly-plot .shapelayer path"  # the boxes around selected cells

# Page coordinates of heatmap cell (row, col), from plotly's own axes (category axes put cell i at i).
CELL_XY = """([row, col]) => {
  const plot = document.querySelector(".nnpatch-workbench .js-plotly-plot");
  const box = plot.getBoundingClientRect(), x = plot._fullLayout.xaxis, y = plot._fullLayout.yaxis;
  return [box.left + x._offset + x.l2p(col), box.top + y._offset + y.l2p(row)];
}"""


class Lab:
    """One JupyterLab server and one chromium for a test module; `open()` shows a notebook in a page."""

    def __init__(self, root: Path, url: str, token: str, browser):
        self.root, self.url, self.token, self.browser = root, url, token, browser
        self.pages = 0

    @contextlib.contextmanager
    def open(self, notebook: str, *, width: int = 1300, height: int = 2200, run: bool = True):
        """A page showing `notebook` (a path under the server's root) with its kernel idle and the
        file browser closed; with `run`, every cell is started. The kernel is shut down on exit."""
        page = self.browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(WAIT_MS)
        try:
            # A workspace of its own, so that the page does not reopen notebooks of earlier pages.
            self.pages += 1
            page.goto(f"{self.url}/lab/workspaces/page{self.pages}/tree/{notebook}?reset&token={self.token}")
            page.wait_for_function(KERNEL_IDLE, timeout=2 * WAIT_MS)
            page.evaluate("() => window.jupyterapp.shell.leftCollapsed || "
                          "window.jupyterapp.commands.execute('application:toggle-left-area')")
            if run:
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            yield page
        except BaseException:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / f"failure-{Path(notebook).stem}.png"))
            raise
        finally:
            with contextlib.suppress(Exception):
                page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
            page.close()


@contextlib.contextmanager
def chromium_browser(chromium: str):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    chromium = _needs()
    root = tmp_path_factory.mktemp("lab")
    with jupyterlab(root) as (url, token), chromium_browser(chromium) as browser:
        yield Lab(root, url, token, browser)


def write_notebook(path: Path, *cells: str) -> str:
    """A notebook of code cells at `path`, for the Python 3 kernel; returns its file name."""
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nbformat.write(nb, path)
    return path.name


def wait_for_widget(page):
    """Wait for the workbench to render; fail at once, with the cell's output, if it cannot."""
    rendered, error = ".nnp-controls .nnp-run", ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']"
    text = ".jp-OutputArea-output[data-mime-type='text/plain']:has-text('Workbench(')"
    page.wait_for_selector(f"{rendered}, {error}, {text}", timeout=2 * WAIT_MS)  # kernel start, model load
    if page.locator(rendered).count() == 0:
        output = page.locator(".jp-OutputArea").first.inner_text()
        hint = "" if page.locator(error).count() else (
            " (shown as text: this JupyterLab has no ipywidgets/anywidget extension for this Python; "
            "check `jupyter labextension list`)")
        pytest.fail(f"the workbench did not render{hint}:\n{output[-2000:]}")


def click_cell(page, cell, shift=False):
    x, y = page.evaluate(CELL_XY, list(cell))
    page.mouse.move(x, y)
    page.wait_for_timeout(200)  # plotly picks the point under the mouse on hover
    if shift:
        page.keyboard.down("Shift")
    page.mouse.click(x, y)
    if shift:
        page.keyboard.up("Shift")


def cell_attr(cell) -> str:
    """A cell as the page writes it in data-cell (JSON.stringify of the list)."""
    return json.dumps(list(cell), separators=(",", ":"))


def shown(page, selector) -> float:
    return float(page.get_attribute(selector, "data-value"))


def assert_close(a, b, tol=TOL):
    assert abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b))), (a, b)


def assert_outcome_shown(page, panel, api, tokenizer, heatmap_value=None):
    """The scores and top-k of `panel` (.nnp-detail or .nnp-combined) equal a PatchedRun's."""
    for key in ("clean_score", "corrupt_score", "patched_score"):
        assert_close(shown(page, f"{panel} .nnp-{key}"), getattr(api, key))
    assert_close(shown(page, f"{panel} .nnp-normalized"), api.score)
    if heatmap_value is not None:
        assert_close(shown(page, f"{panel} .nnp-heatmap_value"), heatmap_value)
    rows = page.locator(f"{panel} .nnp-topk tr[data-rank]")
    for run_i, run in enumerate(("clean", "corrupt", "patched")):
        probs = torch.softmax(getattr(api, f"{run}_logits")[0], -1)
        top = probs.topk(rows.count())
        for rank in range(rows.count()):
            cells = rows.nth(rank).locator("td")
            assert cells.nth(2 * run_i).inner_text() == tokenizer.decode([int(top.indices[rank])])
            assert_close(float(cells.nth(2 * run_i + 1).get_attribute("data-value")), top.values[rank])


def test_workbench_in_jupyterlab(lab):
    model = nnpatch.models.load("ioi")
    options = dict(answer=PAIR.answer, wrong=PAIR.wrong, metric="logit_diff", site="resid_pre", by=("layer", "pos"))
    result = nnpatch.activation_patching(model, PAIR.clean, PAIR.corrupt, progress=False, **options)
    inspected = nnpatch.sweep.patch_cells(model, PAIR.clean, PAIR.corrupt, [INSPECT], **options)
    together = nnpatch.sweep.patch_cells(model, PAIR.clean, PAIR.corrupt, sorted(SELECT), **options)

    shutil.copy(NOTEBOOK, lab.root / NOTEBOOK.name)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with lab.open(NOTEBOOK.name) as page:
        try:
            # Set-up: the first example is loaded, tokens previewed, pickers filled.
            wait_for_widget(page)
            page.wait_for_function("(a) => document.querySelector('.nnp-controls input.nnp-answer').value === a", arg=PAIR.answer)
            assert page.input_value(".nnp-controls input.nnp-wrong") == PAIR.wrong
            assert page.input_value(".nnp-controls textarea.nnp-clean") == PAIR.clean
            clean_tokens = page.locator(".nnp-tokens tr[data-prompt=clean] td")
            assert [clean_tokens.nth(i).inner_text() for i in range(clean_tokens.count())] == \
                model.to_str_tokens(PAIR.clean)
            assert page.locator(".nnp-tokens td.nnp-differ").count() == 2  # position s2, both rows

            # Run: the heatmap and the scores are the API's.
            page.click(".nnp-controls .nnp-run")
            page.wait_for_selector(".nnpatch-workbench .js-plotly-plot .nsewdrag")
            page.wait_for_selector(".nnp-summary .nnp-clean_score")
            assert_close(shown(page, ".nnp-summary .nnp-clean_score"), result.clean_score)
            assert_close(shown(page, ".nnp-summary .nnp-corrupt_score"), result.corrupt_score)
            z = page.evaluate("() => document.querySelector('.nnpatch-workbench .js-plotly-plot').data[0].z")
            assert torch.allclose(torch.tensor(z, dtype=torch.float32), result.values, atol=TOL)
            # The Run button's bar was driven by the sweep to the end, and hides when it is done.
            assert page.evaluate("() => document.querySelector('.nnp-progress').value") == 1
            assert page.locator(".nnp-progress").is_hidden()

            # Hover shows a cell's value; a click shows its detail: patch_cells of that cell alone.
            x, y = page.evaluate(CELL_XY, list(INSPECT))
            page.mouse.move(x, y)
            hover = page.wait_for_selector(".nnpatch-workbench .hoverlayer .hovertext").text_content()
            assert result.labels["pos"][INSPECT[1]] in hover
            assert any(abs(float(x) - float(result.values[INSPECT])) < 1e-3 for x in re.findall(r"-?\d+\.\d+", hover))
            click_cell(page, INSPECT)
            page.wait_for_selector(f".nnp-detail .nnp-title[data-cell='{cell_attr(INSPECT)}']")
            assert_outcome_shown(page, ".nnp-detail", inspected, model.tokenizer, heatmap_value=result.values[INSPECT])

            # Select two cells (select mode, then shift-click), patch them together.
            page.click(".nnp-mode-select")
            click_cell(page, SELECT[0])
            page.wait_for_selector(".nnp-chip >> nth=0")
            page.click(".nnp-mode-inspect")
            click_cell(page, SELECT[1], shift=True)
            page.wait_for_function("() => document.querySelectorAll('.nnp-chip').length === 2")
            page.wait_for_function(f"() => document.querySelectorAll('{SHAPES}').length === 3")  # 2 boxes, 1 outline
            assert page.locator(".nnp-detail .nnp-title").get_attribute("data-cell") == cell_attr(INSPECT)
            page.click(".nnp-patch")
            page.wait_for_selector(".nnp-combined .nnp-normalized")
            assert_outcome_shown(page, ".nnp-combined", together, model.tokenizer)

            # Show code: running it reproduces the numbers on the page.
            page.click(".nnp-show-code")
            page.wait_for_selector(".nnp-code:not([hidden])")
            namespace = {}
            exec(compile(page.inner_text(".nnp-code"), "<shown code>", "exec"), namespace)  # noqa: S102
            assert torch.allclose(namespace["result"].values, result.values, atol=TOL)
            assert_close(namespace["cell"].score, shown(page, ".nnp-detail .nnp-normalized"))
            assert_close(namespace["patched"].score, shown(page, ".nnp-combined .nnp-normalized"))
            page.locator(".nnpatch-workbench").screenshot(path=str(SCREENSHOTS / "workbench.png"))

            # Bad input: a message in the app, never a traceback, and the app keeps working.
            page.fill(".nnp-controls textarea.nnp-corrupt", PAIR.corrupt + " Mary")
            page.wait_for_selector(".nnp-warning:has-text('differ in length')")
            assert page.locator(".nnp-tokens td.nnp-extra").count() == 1
            page.locator(".nnp-controls").screenshot(path=str(SCREENSHOTS / "workbench-length-warning.png"))
            page.click(".nnp-controls .nnp-run")
            page.wait_for_selector(".nnp-controls .nnp-message:has-text('differ in length')")
            page.fill(".nnp-controls textarea.nnp-clean", "")
            page.click(".nnp-controls .nnp-run")
            page.wait_for_selector(".nnp-controls .nnp-message:has-text('clean prompt is empty')")
            second = nnpatch.tasks.ioi(4, seed=1, template=0)[1]
            page.select_option(".nnp-controls select.nnp-pair", "1")  # the second example
            page.wait_for_function("(c) => document.querySelector('.nnp-controls textarea.nnp-clean').value === c",
                                   arg=second.clean)
            page.fill(".nnp-controls input.nnp-answer", " Maryx")
            page.click(".nnp-controls .nnp-run")
            page.wait_for_selector(".nnp-controls .nnp-message:has-text(\"' Maryx' is not in the model's vocabulary\")")
            page.fill(".nnp-controls input.nnp-answer", second.answer)
            before = page.text_content(".nnp-summary")
            page.click(".nnp-controls .nnp-run")
            page.wait_for_function("(old) => document.querySelector('.nnp-summary').textContent !== old", arg=before)
            assert page.locator(".nnp-controls .nnp-message").is_hidden()
            assert page.locator(".nnp-inspector .nnp-chip").count() == 0  # a new run starts afresh
            page.wait_for_function(f"() => document.querySelectorAll('{SHAPES}').length === 0")
            assert page.locator(".jp-OutputArea-output", has_text="Traceback").count() == 0
        except Exception:
            page.screenshot(path=str(SCREENSHOTS / "workbench-failure.png"))
            raise


SAVED_SWEEP = (
    "%load_ext nnpatch\nimport nnpatch\n\nmodel = nnpatch.models.load('ioi')\npairs = nnpatch.tasks.ioi(4, template=0)",
    "result = nnpatch.activation_patching(model, pairs, site='resid_pre', by=('layer', 'pos'))\nresult.plot()",
    "%patch_sweep model --clean pairs --site resid_pre --by layer,pos",
)
# Outputs showing a figure: drawn, or on reopening, the picture plotly's extension saved with it.
PLOTS = ".jp-OutputArea-output.jp-RenderedPlotly:has(.main-svg, img.plot-img)"


def save_notebook(page, path: Path, n_plots: int):
    """Save with JupyterLab's own command, then wait until the page has no unsaved change and the
    file on disk holds the figures (a save started while outputs still arrive would miss some)."""
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty")
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        outputs = [o for c in json.loads(path.read_text())["cells"] for o in c.get("outputs", [])]
        if sum("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs) == n_plots:
            return outputs
        assert time.monotonic() < deadline, f"{path.name} was saved without its {n_plots} figures"
        page.wait_for_timeout(250)


def test_reopened_notebook_shows_no_widget_error(lab):
    """A notebook that ran a sweep and drew heatmaps, saved, closed and opened again, shows its
    figures and no 'Error displaying widget' (a widget saved in the outputs has no model then)."""
    path = lab.root / "saved_sweep.ipynb"
    write_notebook(path, *SAVED_SWEEP)
    with lab.open(path.name) as page:
        page.wait_for_function(f"() => document.querySelectorAll('{PLOTS}').length === 2", timeout=3 * WAIT_MS)
        page.wait_for_function(KERNEL_IDLE)
        outputs = save_notebook(page, path, n_plots=2)
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    with lab.open(path.name, run=False) as page:
        page.wait_for_function(f"() => document.querySelectorAll('{PLOTS}').length === 2")
        page.wait_for_function(KERNEL_IDLE)
        # Each saved widget shows, once the widget manager has tried to restore it, the widget or an error.
        page.wait_for_function("(n) => [...document.querySelectorAll('.jp-OutputArea-output.jupyter-widgets')]"
                               ".filter(o => o.textContent.trim() || o.children.length).length >= n", arg=len(widgets))
        text = page.locator(".jp-Notebook").inner_text()
        page.screenshot(path=str(SCREENSHOTS / "reopened-notebook.png"))
    assert "Error displaying widget" not in text, text[:2000]
    assert not widgets, f"{len(widgets)} widget outputs saved in the notebook (each shows an error when reopened)"
