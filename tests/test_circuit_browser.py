"""The circuit panel in a real browser (JupyterLab 4 headless, Debian's chromium, Playwright).

It runs EAP on the bundled ioi model, drags the threshold slider, clicks an edge of the graph and
shows the code, and checks that every number on the page equals what nnpatch's public API computes
in this process: `edge_attribution`, `Circuit.threshold`, `evaluate_circuit` and `path_patching`.
The panel is checked on its own (`CircuitPanel(model, pairs)` in a cell) and as the workbench's
Circuit tab (one notebook, one kernel). Server, browser and helpers are tests/test_workbench_browser.py's.
"""
import re

import pytest

import nnpatch
from test_workbench_browser import PAIRS as WORKBENCH_PAIRS
from test_workbench_browser import SCREENSHOTS, TAB_PANEL, WORKBENCH, lab, show_tab, shown_on_failure, write_notebook  # noqa: F401

PAIRS = nnpatch.tasks.ioi(4, template=0)
PANEL = ("import nnpatch\nfrom nnpatch.jupyter.circuit_panel import CircuitPanel\n\n"
         "CircuitPanel(nnpatch.models.load('ioi'), nnpatch.tasks.ioi(4, template=0))")
FIRST_EDGES = 30  # the panel's first threshold keeps this many edges

# The edges trace of the circuit graph: its midpoints' edge names and page coordinates.
EDGE_POINTS = """(root) => {
  const plot = root.querySelector(".js-plotly-plot");
  const trace = plot && plot.data && plot.data.find(d => d.name === "edges");
  if (!trace) return null;
  const box = plot.getBoundingClientRect(), x = plot._fullLayout.xaxis, y = plot._fullLayout.yaxis;
  return trace.customdata.map((edge, i) =>
    [edge, box.left + x._offset + x.l2p(trace.x[i]), box.top + y._offset + y.l2p(trace.y[i])]);
}"""


@pytest.fixture(scope="module")
def model():
    return nnpatch.models.load("ioi")


@pytest.fixture(scope="module")
def circuit_page(lab):
    """A notebook showing the panel on its own (cell 1) and a workbench with a Circuit tab (cell 2)."""
    name = write_notebook(lab.root / "circuit.ipynb", PANEL, WORKBENCH)
    with lab.open(name) as page:
        page.wait_for_selector(".nnpatch-workbench .lm-TabBar-tab:has-text('Circuit')", timeout=120_000)
        yield page


@pytest.fixture
def page(circuit_page, request):
    yield from shown_on_failure(circuit_page, request)


def api_scores(model, pairs):
    return {m: nnpatch.edge_attribution(model, pairs, method=m) for m in ("eap", "eap-ig")}


def summary_numbers(text: str) -> tuple[int, int, float, float]:
    """(edges, nodes, fraction, normalised) from the panel's summary line."""
    m = re.match(r"(\d+) edges, (\d+) nodes; keeps (-?[\d.]+) of the clean metric \(normalised (-?[\d.]+)", text)
    assert m, text
    return int(m[1]), int(m[2]), float(m[3]), float(m[4])


def graph_edges(page, root) -> list[str]:
    points = root.evaluate(EDGE_POINTS)
    return sorted(p[0] for p in points or [])


def wait_for_graph(page, root, n_edges: int):
    """The graph is redrawn after the summary: wait until it shows `n_edges` edges."""
    page.wait_for_function(f"(r) => {{ const p = ({EDGE_POINTS})(r); return p && p.length === {n_edges}; }}",
                           arg=root.element_handle())


def threshold_in_code(page, root) -> float:
    """The exact threshold the panel uses: the code it shows writes it with repr()."""
    code = root.locator(".widget-textarea textarea").input_value()
    return float(re.search(r"scores\.threshold\(([^)]+)\)", code)[1])


def assert_circuit_shown(page, root, model, pairs, scores, threshold):
    """The summary and the graph are the circuit of |score| >= threshold and its faithfulness."""
    circuit = scores.threshold(threshold)
    faith = nnpatch.evaluate_circuit(model, pairs, circuit=circuit)
    n_edges, n_nodes, fraction, normalized = summary_numbers(root.locator(".widget-html-content", has_text="edges").inner_text())
    assert (n_edges, n_nodes) == (len(circuit), len(circuit.nodes))
    wait_for_graph(page, root, n_edges)
    assert graph_edges(page, root) == sorted(circuit.kept_edges)
    assert abs(fraction - faith.fraction) <= 6e-4 and abs(normalized - faith.normalized) <= 6e-4, (fraction, faith)


def drag_threshold(page, root, fraction: float):
    """Drag the threshold slider's handle to `fraction` of its track, as a user would."""
    slider = root.locator(".widget-hslider", has=page.locator("label", has_text="|score|"))
    slider.scroll_into_view_if_needed()
    handle, track = slider.locator(".noUi-handle").bounding_box(), slider.locator(".noUi-base").bounding_box()
    y = handle["y"] + handle["height"] / 2
    page.mouse.move(handle["x"] + handle["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(track["x"] + fraction * track["width"], y, steps=8)
    page.mouse.up()


def lonely_edge(points) -> tuple[str, float, float]:
    """The edge whose midpoint is farthest from every other midpoint (a click there picks it)."""
    def gap(p):
        return min(((p[1] - q[1]) ** 2 + (p[2] - q[2]) ** 2 for q in points if q is not p), default=1e9)
    return max(points, key=gap)


def check_panel(page, root, model, pairs, screenshot=None):
    """Run EAP, drag the threshold, click an edge, show the code; every number is the API's."""
    scores = api_scores(model, pairs)
    summary = root.locator(".widget-html-content", has_text="edges")
    root.locator(".widget-button", has_text="Run").click()
    summary.wait_for()
    ranked = scores["eap"].scores.abs().sort(descending=True).values
    assert_circuit_shown(page, root, model, pairs, scores["eap"], float(ranked[FIRST_EDGES - 1]))
    root.locator(".widget-toggle-button", has_text="Show code").click()
    code = root.locator(".widget-textarea textarea")
    code.wait_for()
    assert "edge_attribution(model, **pairs, method='eap'" in code.input_value()

    # Slide: the circuit, its graph, its faithfulness and the code follow the slider.
    before = summary.inner_text()
    drag_threshold(page, root, 0.1)
    page.wait_for_function("([r, old]) => r.querySelector('.widget-html-content').textContent !== old",
                           arg=[root.element_handle(), before])
    page.wait_for_function("([r, old]) => !r.querySelector('.widget-textarea textarea').value.includes(old)",
                           arg=[root.element_handle(), f"threshold({float(ranked[FIRST_EDGES - 1])!r})"])
    threshold = threshold_in_code(page, root)
    assert 0.05 * float(ranked[0]) < threshold < 0.15 * float(ranked[0])  # the slider spans 0 .. the top score
    assert_circuit_shown(page, root, model, pairs, scores["eap"], threshold)

    # Click an edge: its score, and the metric's change when that edge alone is patched.
    root.locator(".js-plotly-plot").scroll_into_view_if_needed()
    edge, x, y = lonely_edge(root.evaluate(EDGE_POINTS))
    page.mouse.move(x, y)
    page.wait_for_selector(f".hoverlayer .hovertext:has-text('{edge}')")
    page.mouse.click(x, y)
    info = root.locator(".widget-html-content", has_text="patched alone")
    info.wait_for()
    m = re.fullmatch(r"(\S+): score (\S+); patched alone, the metric changes by (\S+)", info.inner_text())
    assert m and m[1] == edge, info.inner_text()
    sender, receiver = edge.split("->")
    alone = float(nnpatch.path_patching(model, pairs, senders=[sender], receivers=[receiver]).change[0])
    score = float(scores["eap"].scores[scores["eap"].edges.index(edge)])
    assert abs(float(m[2]) - score) <= 6e-4 * max(1.0, abs(score))
    assert abs(float(m[3]) - alone) <= 6e-4 * max(1.0, abs(alone))
    if screenshot:
        root.screenshot(path=str(SCREENSHOTS / screenshot))
    assert root.locator(".widget-dropdown", has=page.locator("label", has_text="edge")).locator("select").input_value() == edge
    page.wait_for_function("([r, s]) => r.querySelector('.widget-textarea textarea').value.includes(s)",
                           arg=[root.element_handle(), f"senders=[{sender!r}], receivers=[{receiver!r}]"])

    # The code on the page computes the numbers on the page.
    namespace = {}
    exec(compile(code.input_value().replace("model = ...", "model = MODEL"), "<shown code>", "exec"),  # noqa: S102
         {"MODEL": model}, namespace)
    assert sorted(namespace["circuit"].kept_edges) == graph_edges(page, root)
    assert abs(namespace["faithfulness"].fraction - summary_numbers(summary.inner_text())[2]) <= 6e-4
    assert abs(float(namespace["alone"]) - float(m[3])) <= 6e-4 * max(1.0, abs(float(m[3])))

    # EAP-IG: another method, the same first circuit size, its own edges.
    root.locator(".widget-dropdown", has=page.locator("label", has_text="method")).locator("select").select_option("EAP-IG")
    root.locator(".widget-button", has_text="Run").click()
    page.wait_for_function("(r) => r.querySelector('.widget-textarea textarea').value.includes(\"method='eap-ig', steps=5\")",
                           arg=root.element_handle())
    ranked = scores["eap-ig"].scores.abs().sort(descending=True).values
    assert_circuit_shown(page, root, model, pairs, scores["eap-ig"], float(ranked[FIRST_EDGES - 1]))
    assert page.locator(".jp-OutputArea-output", has_text="Traceback").count() == 0


def test_circuit_panel_alone(page, model):
    root = page.locator(".jp-Cell").nth(0).locator(".jp-OutputArea-output")
    root.locator(".widget-button", has_text="Run").wait_for()
    check_panel(page, root, model, PAIRS)


def test_circuit_tab_of_the_workbench(page, model):
    """The same panel as the workbench's Circuit tab, on the workbench's pairs."""
    show_tab(page, "Circuit")
    root = page.locator(".jp-Cell").nth(1).locator(TAB_PANEL)
    check_panel(page, root, model, WORKBENCH_PAIRS, screenshot="circuit-tab.png")
