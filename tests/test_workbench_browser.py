"""The workbench in a real browser: JupyterLab 4 headless, Debian's chromium driven by Playwright.

The tests open a notebook with a Workbench on the bundled ioi model (one page and kernel for the
module), click Run, click heatmap cells, select cells and patch them together, show the code,
and check that every number the page shows equals what nnpatch's Python API computes in this
process. They feed the app bad input and stale inputs (a message, never a traceback or a number
of other inputs), press the notebook's run keys inside it, run all pairs, open a head's attention
pattern and the logit lens, measure the layout at two window sizes, and reopen a saved notebook.
Screenshots go to out/screenshots/ (scripts/screenshots.py copies the docs' ones to docs/).

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
# The workbench on the bundled ioi model; its tabs: Patching, Head, Logit lens, Noise, Sites, Circuit.
WORKBENCH = """import nnpatch

model = nnpatch.models.load("ioi")
pairs = nnpatch.tasks.ioi(4, seed=1, template=0)
wb = nnpatch.Workbench(model, pairs=pairs)
wb"""
PAIRS = nnpatch.tasks.ioi(4, seed=1, template=0)
SCREENSHOTS = ROOT / "out" / "screenshots"
PAIR = PAIRS[0]  # the notebook's first example
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


HEATMAP_SETTLED = """() => {
  const plot = document.querySelector(".nnpatch-workbench .js-plotly-plot");
  return !!plot && !!plot._fullLayout && Math.abs(plot._fullLayout.width - plot.parentElement.clientWidth) <= 2;
}"""


def wait_for_heatmap(page):
    """The heatmap drawn at its box's width: the page measures the box and Python redraws the
    figure that wide, so a cell's place on the page is known only once the two agree."""
    page.wait_for_selector(".nnpatch-workbench .js-plotly-plot .nsewdrag")
    page.wait_for_function(HEATMAP_SETTLED)


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


@pytest.fixture(scope="module")
def wb_page(lab):
    """The workbench notebook, run once for the module's tests."""
    name = write_notebook(lab.root / "workbench.ipynb", WORKBENCH)
    with lab.open(name) as page:
        wait_for_widget(page)
        yield page


def shown_on_failure(page, request):
    """Yield `page` to one test; when the test fails, keep a screenshot of it."""
    failed = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"failure-{request.node.name}.png"), full_page=True)


@pytest.fixture
def page(wb_page, request):
    """The workbench page; a screenshot of it when the test fails."""
    yield from shown_on_failure(wb_page, request)


@pytest.fixture(scope="module")
def model():
    return nnpatch.models.load("ioi")


def test_workbench_in_jupyterlab(page, model):
    options = dict(answer=PAIR.answer, wrong=PAIR.wrong, metric="logit_diff", site="resid_pre", by=("layer", "pos"))
    result = nnpatch.activation_patching(model, PAIR.clean, PAIR.corrupt, progress=False, **options)
    inspected = nnpatch.sweep.patch_cells(model, PAIR.clean, PAIR.corrupt, [INSPECT], **options)
    together = nnpatch.sweep.patch_cells(model, PAIR.clean, PAIR.corrupt, sorted(SELECT), **options)

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
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
    wait_for_heatmap(page)
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


# -- helpers for the tests below: each starts from a fresh run of a chosen example -----------------
TAB_PANEL = ".nnpatch-workbench .widget-tab-contents > .lm-Widget:not(.lm-mod-hidden)"  # the tab on screen
PATCHING_PLOTS = ".nnpatch-workbench .widget-tab-contents > :first-child .js-plotly-plot"  # heatmap, then per pair
HEATMAP_BOX = ".nnpatch-workbench .nnp-patching > :first-child"
INSPECTOR_BOX = ".nnpatch-workbench .nnp-patching > :nth-child(2)"
MARY = ("When Mary and John went to the store, John gave a drink to",  # the README's prompts
        "When Mary and John went to the store, Mary gave a drink to")


def show_tab(page, title: str):
    page.click(f".nnpatch-workbench .lm-TabBar-tab:has-text('{title}')")
    page.wait_for_selector(f".nnpatch-workbench .lm-TabBar-tab.lm-mod-current:has-text('{title}')")


def run_app(page, start=None):
    """Run the app (click Run, or `start()`), and wait until the run is on screen."""
    history = page.text_content("[data-testid=history-position]")
    (start or (lambda: page.click("[data-testid=run]")))()
    page.wait_for_function("(old) => document.querySelector('[data-testid=history-position]').textContent !== old"
                           " && !document.querySelector('[data-testid=run]').disabled", arg=history)


def fresh_run(page, pair: str = "0", granularity: str = "layer × pos"):
    """Example `pair` ("-2": all pairs), cells by `granularity`, run, Patching tab on screen."""
    show_tab(page, "Patching")
    picker = "[data-testid=pair-picker]"
    if page.input_value(picker) == pair:  # choosing it again would not reload its prompts
        page.select_option(picker, "1" if pair == "0" else "0")
    page.select_option(picker, pair)
    if pair not in ("-1", "-2"):
        page.wait_for_function("(c) => document.querySelector('[data-testid=clean-prompt]').value === c",
                               arg=PAIRS[int(pair)].clean)
    page.select_option("[data-testid=granularity]", label=granularity)
    run_app(page)
    assert page.locator("[data-testid=stale-banner]").is_hidden()
    page.locator(".nnpatch-workbench").scroll_into_view_if_needed()
    wait_for_heatmap(page)


def plot_data(page, root: str):
    """The traces of the first plotly figure in `root` (a selector), once it has any."""
    page.wait_for_function("(r) => { const p = document.querySelector(r + ' .js-plotly-plot');"
                           " return p && p.data && p.data.length > 0; }", arg=root)
    return page.evaluate("(r) => document.querySelector(r + ' .js-plotly-plot').data"
                         ".map(t => ({z: t.z, text: t.text, type: t.type}))", root)


def next_token_probs(model, prompt: str) -> torch.Tensor:
    with model.trace() as tracer:
        with tracer.invoke(prompt):
            logits = model.lm_head.output[:, -1]
    return torch.softmax(logits[0].detach().float(), -1)


def token_id(model, token: str) -> int:
    ids = model.tokenizer(token)["input_ids"]
    assert len(ids) == 1, (token, ids)
    return ids[0]


def test_stale_answer_is_resuggested_and_warned(page, model):
    """Issue 17's reproducer: example 4, then the README's Mary/John prompts typed in. The
    example's answer and wrong token no longer occur: the app suggests the model's predictions,
    and an answer the model does not predict is warned about with its probability."""
    fresh_run(page, "3")
    page.fill("[data-testid=clean-prompt]", MARY[0])
    page.fill("[data-testid=corrupt-prompt]", MARY[1])
    clean_p, corrupt_p = next_token_probs(model, MARY[0]), next_token_probs(model, MARY[1])
    top = model.tokenizer.decode([int(clean_p.argmax())]), model.tokenizer.decode([int(corrupt_p.argmax())])
    assert top == (" Mary", " John")  # what the bundled model predicts
    page.wait_for_function("([a, w]) => document.querySelector('[data-testid=answer]').value === a"
                           " && document.querySelector('[data-testid=wrong]').value === w", arg=list(top))
    run_app(page)
    assert_close(shown(page, ".nnp-p-answer-clean"), clean_p[token_id(model, top[0])], tol=1e-3)
    assert_close(shown(page, ".nnp-p-wrong-corrupt"), corrupt_p[token_id(model, top[1])], tol=1e-3)
    assert page.locator("[data-testid=answer-warning]").is_hidden()

    # An answer the model does not predict (p = 0.000): a warning, and the p it runs with.
    old = " drink"
    page.fill("[data-testid=answer]", old)
    p_old = float(clean_p[token_id(model, old)])
    warning = page.locator("[data-testid=answer-warning]")
    warning.wait_for()
    assert f"the answer {old!r} is not among the clean run's top 8" in warning.inner_text()
    assert f"(p = {p_old:.3f})" in warning.inner_text()
    run_app(page)
    assert_close(shown(page, ".nnp-p-answer-clean"), p_old, tol=1e-3)


def test_edited_inputs_mark_the_heatmap_out_of_date(page):
    """After a run, editing a prompt dims the heatmap, says "inputs changed: Run", and a click on
    the out-of-date heatmap patches nothing; Run makes it current again."""
    fresh_run(page, "0")
    click_cell(page, INSPECT)
    page.wait_for_selector(f".nnp-detail .nnp-title[data-cell='{cell_attr(INSPECT)}']")
    page.fill("[data-testid=clean-prompt]", PAIR.clean.replace(" gave", " handed"))
    page.wait_for_selector("[data-testid=stale-banner]:has-text('inputs changed: Run')")
    page.wait_for_selector(f"{HEATMAP_BOX}.nnp-stale")
    assert page.locator("[data-testid=inspector-stale-banner]").is_visible()
    other = SELECT[1]
    click_cell(page, other)
    page.wait_for_selector("[data-testid=inspector-message]:has-text('inputs changed: Run first')")
    assert page.locator(".nnp-detail .nnp-title").get_attribute("data-cell") == cell_attr(INSPECT)
    assert page.locator(f".nnp-detail .nnp-title[data-cell='{cell_attr(other)}']").count() == 0
    run_app(page)
    page.wait_for_selector(f"{HEATMAP_BOX}:not(.nnp-stale)")
    assert page.locator("[data-testid=stale-banner]").is_hidden()


def test_run_keys_in_the_app_run_the_app_not_the_cell(page):
    """Shift+Enter and Ctrl+Enter in the app's text fields run the app: the notebook cell is not
    run again (its execution count and the widget on the page stay) and no newline is typed."""
    fresh_run(page, "0")
    prompt = page.locator(".jp-Cell .jp-InputPrompt").first.inner_text()
    page.evaluate("() => { document.querySelector('.nnpatch-workbench').dataset.mark = 'first'; }")
    page.click("[data-testid=clean-prompt]")
    run_app(page, lambda: page.keyboard.press("Shift+Enter"))
    page.click("[data-testid=answer]")
    run_app(page, lambda: page.keyboard.press("Control+Enter"))
    assert page.input_value("[data-testid=clean-prompt]") == PAIR.clean  # no newline typed
    assert page.locator(".jp-Cell .jp-InputPrompt").first.inner_text() == prompt
    assert page.locator(".nnpatch-workbench").count() == 1
    assert page.get_attribute(".nnpatch-workbench", "data-mark") == "first"  # the same widget, not a new one


def test_all_pairs_mean_view(page, model):
    """ "all pairs (mean)" shows activation_patching over the notebook's pairs, the spread on
    hover, and one small heatmap per pair, each that pair's own sweep."""
    fresh_run(page, "-2")
    options = dict(site="resid_pre", by=("layer", "pos"), progress=False)
    result = nnpatch.activation_patching(model, PAIRS, **options)
    assert "× 4 pairs" in page.text_content("[data-testid=summary]")
    z = page.evaluate("() => document.querySelector('.nnpatch-workbench .js-plotly-plot').data[0].z")
    assert torch.allclose(torch.tensor(z, dtype=torch.float32), result.values, atol=TOL)
    page.mouse.move(*page.evaluate(CELL_XY, list(INSPECT)))
    assert "4 pairs: min" in page.wait_for_selector(".nnpatch-workbench .hoverlayer .hovertext").text_content()
    page.click("[data-testid=per-pair]")
    page.wait_for_function("(s) => { const p = document.querySelectorAll(s);"
                           " return p.length === 2 && p[1].data && p[1].data.length >= 4; }", arg=PATCHING_PLOTS)
    small = page.evaluate("(s) => document.querySelectorAll(s)[1].data.filter(t => t.type === 'heatmap').map(t => t.z)",
                          PATCHING_PLOTS)
    assert len(small) == len(PAIRS)
    for z, pair in zip(small, PAIRS):
        one = nnpatch.activation_patching(model, pair.clean, pair.corrupt, answer=pair.answer, wrong=pair.wrong, **options)
        assert torch.allclose(torch.tensor(z, dtype=torch.float32), one.values, atol=TOL)
    page.locator(".nnpatch-workbench").screenshot(path=str(SCREENSHOTS / "workbench-mean.png"))
    page.click("[data-testid=hide-extra]")


def test_head_tab_shows_the_clicked_heads_attention(page, model):
    """Cells by layer × head: a click on a head, then the Head tab shows that head's attention
    pattern on the clean and the corrupt prompt and its direct logit attribution."""
    fresh_run(page, "0", granularity="layer × head")
    layer, head = 1, 2
    click_cell(page, (layer, head))
    page.wait_for_selector(f".nnp-detail .nnp-title[data-cell='{cell_attr((layer, head))}']")
    show_tab(page, "Head")
    note = page.locator(TAB_PANEL).locator(".widget-html-content").first
    note.wait_for()
    page.wait_for_function("(r) => document.querySelector(r).textContent.includes('Head L1H2')", arg=TAB_PANEL)
    traces = plot_data(page, TAB_PANEL)
    for trace, prompt in zip(traces[:2], (PAIR.clean, PAIR.corrupt)):
        want = nnpatch.attention_pattern(model, prompt, layer, head).weights
        got = torch.tensor([[0.0 if v is None else v for v in row] for row in trace["z"]])
        assert got.shape == want.shape and torch.allclose(got, want.tril(), atol=TOL)
        assert all(v is None for i, row in enumerate(trace["z"]) for v in row[i + 1:])  # above the diagonal: blank
    dla = [nnpatch.head_logit_attribution(model, p, PAIR.answer, PAIR.wrong)[layer, head] for p in (PAIR.clean, PAIR.corrupt)]
    shown_dla = [float(x) for x in re.findall(r"([+-]\d+\.\d+) on the (?:clean|corrupt) run", note.inner_text())]
    assert len(shown_dla) == 2 and all(abs(a - float(b)) <= 6e-4 for a, b in zip(shown_dla, dla)), (note.inner_text(), dla)
    page.locator(".nnpatch-workbench").screenshot(path=str(SCREENSHOTS / "workbench-head.png"))


def test_logit_lens_tab(page, model):
    """The Logit lens tab: top token and p(answer) per layer and position for the clean run, the
    corrupt run and the run the inspected cell patched, each the public logit_lens's."""
    fresh_run(page, "0")
    click_cell(page, INSPECT)
    page.wait_for_selector(f".nnp-detail .nnp-title[data-cell='{cell_attr(INSPECT)}']")
    show_tab(page, "Logit lens")
    page.wait_for_function("(r) => { const p = document.querySelector(r + ' .js-plotly-plot');"
                           " return p && p.data && p.data.length === 3; }", arg=TAB_PANEL)
    traces = plot_data(page, TAB_PANEL)
    patch = dict(source=PAIR.clean, site="resid_pre", cell=INSPECT, by=("layer", "pos"))
    lenses = [nnpatch.logit_lens(model, PAIR.clean, PAIR.answer), nnpatch.logit_lens(model, PAIR.corrupt, PAIR.answer),
              nnpatch.logit_lens(model, PAIR.corrupt, PAIR.answer, patch=patch)]
    for trace, lens in zip(traces, lenses):
        assert trace["text"] == [[repr(t)[1:-1] for t in row] for row in lens.top_tokens]
        assert torch.allclose(torch.tensor(trace["z"], dtype=torch.float32), lens.answer_probs, atol=TOL)
    page.locator(".nnpatch-workbench").screenshot(path=str(SCREENSHOTS / "workbench-logit-lens.png"))


BOXES = """() => {
  const rect = (s) => { const r = document.querySelector(s).getBoundingClientRect();
                        return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width}; };
  const app = document.querySelector(".nnpatch-workbench"), plot = document.querySelector(".nnpatch-workbench .js-plotly-plot");
  return {app: rect(".nnpatch-workbench"), appOverflow: app.scrollWidth - app.clientWidth,
          output: rect(".jp-OutputArea-output:has(.nnpatch-workbench)"), heatmapBox: rect("%s"),
          plot: plot.querySelector(".main-svg").getBoundingClientRect().toJSON(), inspector: rect("%s"), plotWidth: plot._fullLayout.width,
          firstTick: plot.querySelector(".xtick text").getBoundingClientRect().toJSON(),
          title: plot.querySelector(".gtitle").getBoundingClientRect().toJSON(),
          modebar: plot.querySelector(".modebar").getBoundingClientRect().toJSON()};
}""" % (HEATMAP_BOX, INSPECTOR_BOX)


@pytest.mark.parametrize("width, height, beside", [(1280, 800, True), (800, 900, False)])
def test_layout(page, width, height, beside):
    """At 1280 x 800 the inspector sits beside the heatmap, at 800 x 900 below it; the app never
    overflows sideways, the heatmap stays inside its box, its first position label inside the
    figure and its title clear of the modebar."""
    fresh_run(page, "0")
    click_cell(page, INSPECT)
    page.wait_for_selector(f".nnp-detail .nnp-title[data-cell='{cell_attr(INSPECT)}']")
    try:
        page.set_viewport_size({"width": width, "height": height})
        # The figure's width is measured in the page and set from Python, and a scroll bar coming or
        # going changes the page's width again: wait for a layout that holds, or fail with the last one.
        where = "beside" if beside else "below"
        settled = f"""() => {{
          const b = ({BOXES})(), near = (a, c) => Math.abs(a - c) <= 2;
          const fits = b.output.right <= window.innerWidth && b.appOverflow <= 1 && b.app.right <= b.output.right + 1;
          const inside = b.heatmapBox.left - 1 <= b.plot.left && b.plot.right <= b.heatmapBox.right + 1
                         && near(b.plotWidth, b.heatmapBox.width);
          const placed = "{where}" === "beside"
            ? b.inspector.left >= b.heatmapBox.right - 1 && b.inspector.top < b.heatmapBox.bottom
            : b.inspector.top >= b.heatmapBox.bottom - 1;
          // No tick label leaves the figure (rotated position labels reach left and down), and the
          // modebar's buttons (drawn on hover) never cover the title.
          const t = b.firstTick, labelled = b.plot.left <= t.left && t.right <= b.plot.right && t.bottom <= b.plot.bottom;
          const m = b.modebar, clear = b.title.top >= m.bottom || b.title.right <= m.left;
          return fits && inside && placed && labelled && clear;
        }}"""
        try:
            page.wait_for_function(settled, timeout=20_000)
        except Exception:
            pytest.fail(f"at {width} x {height}: no overflow, heatmap inside its box, inspector {where} it, "
                        "first tick label inside the figure, title clear of the modebar: "
                        f"{page.evaluate(BOXES)}")
        page.locator(".nnpatch-workbench").screenshot(path=str(SCREENSHOTS / f"workbench-{width}.png"))
    finally:
        page.set_viewport_size({"width": 1300, "height": 2200})


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
