"""Circuit figures show what the results hold: every kept edge once with its score, nodes where
their layer and head are, path patching's heatmap cell for cell."""
import math

import pytest

import nnpatch
from nnpatch.jupyter import circuit_plot

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ioi():
    return nnpatch.models.load("ioi"), nnpatch.tasks.ioi(4, template=0)


def test_graph_draws_each_kept_edge_with_its_score(ioi):
    model, pairs = ioi
    circuit = nnpatch.edge_attribution(model, pairs).top(25)
    fig = circuit_plot.graph(circuit)
    mids = next(t for t in fig.data if t.name == "edges")
    assert sorted(mids.customdata) == sorted(circuit.kept_edges)
    scores = {r["edge"]: r["score"] for r in circuit.edges_table()}
    for edge, text in zip(mids.customdata, mids.text):
        assert text == f"{edge}<br>score {scores[edge]:.4g}"
    nodes = fig.data[-1]
    assert list(nodes.customdata) == circuit.nodes
    for name, x, y in zip(nodes.customdata, nodes.x, nodes.y):
        if name.startswith("a"):
            layer, head = name[1:].split(".h")
            assert (x, y) == (int(head), int(layer))
        elif name.startswith("m"):
            assert (x, y) == (4, int(name[1:]) + 0.5)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert sum(len(t.x) for t in lines) == 3 * len(circuit)
    widest = max(lines, key=lambda t: t.line.width)
    top_edge = circuit.edges_table()[0]
    assert widest.line.color.startswith("rgba(200" if top_edge["score"] < 0 else "rgba(40")
    assert fig.layout.yaxis.autorange == "reversed" and "sendDataToCloud" in fig.layout.modebar.remove
    lo, hi = fig.layout.xaxis.range  # every head column and the MLPs' are on screen, used or not
    assert lo < 0 and hi > 4 and list(fig.layout.xaxis.ticktext) == ["h0", "h1", "h2", "h3", "MLP"]


def test_heads_heatmap_is_the_path_patching_grid(ioi):
    model, pairs = ioi
    result = nnpatch.path_patching(model, pairs, receivers=["a3.h0<q>", "a3.h1<q>"])
    for values in ("change", "normalized"):
        fig = circuit_plot.heads(result, values=values)
        grid = result.heads(getattr(result, values))
        z = fig.data[0].z
        for i in range(4):
            for h in range(4):
                want = grid[i, h].item()
                assert (z[i][h] is None) if math.isnan(want) else abs(z[i][h] - want) < 1e-9
    assert z[3][0] is None and z[2][1] is not None
