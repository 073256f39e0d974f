"""The circuit panel: its controller gives the public API's numbers, its code reproduces them, and
the widget shows them (driven from Python; no browser)."""
from types import SimpleNamespace

import pytest
import torch

import nnpatch
from nnpatch.jupyter.circuit_controller import DEFAULT_EDGES, CircuitController
from nnpatch.jupyter.circuit_panel import CircuitPanel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ioi():
    return nnpatch.models.load("ioi"), nnpatch.tasks.ioi(4, template=0)


def test_controller_numbers_are_the_public_api(ioi):
    model, pairs = ioi
    ctl = CircuitController(model, pairs)
    view = ctl.run(method="eap-ig", steps=3)
    scores = nnpatch.edge_attribution(model, pairs, method="eap-ig", steps=3)
    assert torch.allclose(ctl.scores.scores, scores.scores, atol=1e-6)
    ranked = scores.scores.abs().sort(descending=True).values
    assert view.n_edges == DEFAULT_EDGES and view.threshold == pytest.approx(float(ranked[DEFAULT_EDGES - 1]))
    want = nnpatch.evaluate_circuit(model, pairs, scores.threshold(view.threshold))
    assert view.fraction == pytest.approx(want.fraction, abs=1e-5)

    smaller = ctl.set_threshold(float(ranked[4]))
    assert smaller.n_edges == 5 and smaller.message == ""
    kept = ctl.set_threshold(1e6)  # keeps nothing: says so, keeps the last circuit
    assert "keeps no edge" in kept.message and kept.n_edges == 5

    edge = ctl.circuit.edges_table()[0]["edge"]
    sender, receiver = edge.split("->")
    alone = ctl.select_edge(edge)
    path = nnpatch.path_patching(model, pairs, senders=[sender], receivers=[receiver])
    assert alone.patched_alone == pytest.approx(float(path.change[0]), abs=1e-5)
    assert alone.score == pytest.approx(float(scores.scores[scores.edges.index(edge)]), abs=1e-6)

    # The code it shows computes the same numbers.
    namespace = {}
    exec(ctl.code().replace("model = ...", "model = MODEL"), {"MODEL": model}, namespace)
    assert namespace["faithfulness"].fraction == pytest.approx(smaller.fraction, abs=1e-5)
    assert float(namespace["alone"]) == pytest.approx(alone.patched_alone, abs=1e-5)


def test_one_pair_scope_and_bad_input(ioi):
    model, pairs = ioi
    ctl = CircuitController(model, pairs)
    ctl.run(scope="pair", pair_index=2)
    one = nnpatch.edge_attribution(model, [pairs[2].clean], [pairs[2].corrupt], answer=[pairs[2].answer],
                                   wrong=[pairs[2].wrong])
    assert torch.allclose(ctl.scores.scores, one.scores, atol=1e-6)
    with pytest.raises(nnpatch.NNPatchError, match="pair 9 does not exist; there are 4 pairs"):
        ctl.run(pair_index=9)
    with pytest.raises(nnpatch.NNPatchError, match="edge 'a9.h0->m0' is not in the graph"):
        ctl.select_edge("a9.h0->m0")
    with pytest.raises(nnpatch.NNPatchError, match="run edge attribution first"):
        CircuitController(model, pairs).set_threshold(0.1)


def test_panel_shows_what_the_controller_computes(ioi):
    model, pairs = ioi
    panel = CircuitPanel(model, pairs)
    assert panel.threshold.disabled and panel.code.layout.display == "none"
    panel.run_button.click()
    ctl = panel.controller
    assert panel.summary.value.startswith(f"<b>{DEFAULT_EDGES} edges</b>")
    edges_trace = next(t for t in panel.graph.data if t.name == "edges")
    assert sorted(edges_trace.customdata) == sorted(ctl.circuit.kept_edges)
    assert panel.graph._config["displaylogo"] is False

    panel.threshold.value = panel.threshold.max / 4
    assert len(ctl.circuit) == int((ctl.scores.scores.abs() >= panel.threshold.value).sum())
    assert panel.summary.value.startswith(f"<b>{len(ctl.circuit)} edges</b>")
    assert list(panel.edge.options)[0] == ctl.circuit.edges_table()[0]["edge"]

    trace = next(t for t in panel.graph.data if t.name == "edges")
    panel._clicked(trace, SimpleNamespace(point_inds=[0]), None)  # what a click on the first midpoint sends
    clicked = trace.customdata[0]
    assert panel.edge.value == clicked and ctl.selected.edge == clicked
    assert panel.edge_info.value.startswith(f"<b>{clicked.replace('<', '&lt;').replace('>', '&gt;')}</b>")

    panel.show_code.value = True
    assert panel.code.layout.display == "" and "path_patching" in panel.code.value
    for m in model.module.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
