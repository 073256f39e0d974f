"""Circuit figures (plotly): the circuit as a graph, and path patching's per-head heatmap.

Both take computed results and return a `plotly.graph_objects.Figure`; nothing here runs a model.

    >>> import nnpatch
    >>> from nnpatch.jupyter import circuit_plot
    >>> model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(8, template=0)
    >>> fig = circuit_plot.graph(nnpatch.edge_attribution(model, pairs).top(30))
    >>> fig.layout.yaxis.autorange
    'reversed'
    >>> pp = nnpatch.path_patching(model, pairs, receivers="logits")
    >>> fig = circuit_plot.heads(pp)

Both return nnpatch `Figure`s (`figures.py`): no plotly logo or cloud button, the container's
width, and `theme="auto" | "light" | "dark"`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import plotly.graph_objects as go

from ..errors import NNPatchValueError
from ..patching.circuit import node_position
from .figures import CONFIG, Figure, finish  # noqa: F401 - CONFIG: the circuit panel's widget config

if TYPE_CHECKING:
    from ..patching.circuit import Circuit
    from ..patching.path_patching import PathPatchingResult

_QKV_OFFSET = {"q": -0.22, "k": 0.0, "v": 0.22}


def graph(circuit: Circuit, *, title: str | None = None, height: int | None = None,
          theme: str | go.layout.Template | None = None) -> Figure:
    """The kept edges of `circuit`: layers top to bottom (input first, logits last), heads left to
    right and the MLP at the right; an edge's width grows with |score|, red lowers the metric when
    patched (the edge supports the behaviour), blue raises it. A head's query, key and value inputs
    are the left, middle and right of its node. Hovering an edge's midpoint shows its score; each
    midpoint's `customdata` is the edge name (the panel's click handler reads it)."""
    n_layers, n_heads = circuit.key.n_layers, circuit.key.n_heads
    rows = circuit.edges_table()
    top = max((abs(r["score"]) for r in rows), default=1.0) or 1.0

    def where(node: str, which: str | None = None) -> tuple[float, float]:
        layer, head = node_position(node, n_layers)
        if node in ("input", "logits"):
            x = (n_heads - 1) / 2
        else:
            x = float(n_heads if head is None else head)
        y = layer + (0.0 if head is not None or node in ("input", "logits") else 0.5)  # MLP below attention
        return x + (_QKV_OFFSET[which] if which else 0.0), y

    fig = go.Figure()
    bins: dict[tuple[bool, int], tuple[list, list]] = {}
    mids = {"x": [], "y": [], "text": [], "edge": []}
    for r in rows:
        which = r["receiver"].partition("<")[2].rstrip(">") or None
        x0, y0 = where(r["sender"])
        x1, y1 = where(circuit.receiver_nodes(r["receiver"])[0], which)  # a shared key/value head: its first query head
        key = (r["score"] < 0, min(4, int(5 * abs(r["score"]) / top)))
        xs, ys = bins.setdefault(key, ([], []))
        xs += [x0, x1, None]
        ys += [y0, y1, None]
        mids["x"].append((x0 + x1) / 2)
        mids["y"].append((y0 + y1) / 2)
        mids["text"].append(f"{r['edge']}<br>score {r['score']:.4g}")
        mids["edge"].append(r["edge"])
    for (negative, level), (xs, ys) in sorted(bins.items()):
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"width": 1 + 1.5 * level,
                                       "color": "rgba(200,40,40,0.7)" if negative else "rgba(40,80,200,0.7)"}))
    fig.add_trace(go.Scatter(x=mids["x"], y=mids["y"], mode="markers", name="edges", showlegend=False,
                             marker={"size": 7, "opacity": 0.0}, text=mids["text"], customdata=mids["edge"],
                             hovertemplate="%{text}<extra></extra>"))
    weight = {row["node"]: row["weight"] for row in circuit.nodes_table()}
    nodes = circuit.nodes
    xy = [where(n) for n in nodes]
    fig.add_trace(go.Scatter(
        x=[p[0] for p in xy], y=[p[1] for p in xy], mode="markers+text", text=nodes, textposition="top center",
        showlegend=False, customdata=nodes, hovertemplate="%{customdata}<br>|score| of its edges %{marker.color:.4g}<extra></extra>",
        marker={"size": 16, "symbol": ["square" if n.startswith("m") else "circle" for n in nodes],
                "color": [weight.get(n, 0.0) for n in nodes], "colorscale": "Greys", "line": {"width": 1}}))
    fig.update_layout(
        title=title or f"circuit: {len(circuit)} edges, {len(nodes)} nodes ({circuit.method or 'scores'}, {circuit.metric})",
        height=height or 140 + 90 * (n_layers + 2),
        xaxis={"tickvals": list(range(n_heads)) + [n_heads], "ticktext": [f"h{h}" for h in range(n_heads)] + ["MLP"],
               "range": [-0.6, n_heads + 0.6], "showgrid": False, "zeroline": False},  # every column, used or not
        yaxis={"autorange": "reversed", "tickvals": list(range(-1, n_layers + 1)),
               "ticktext": ["input"] + [f"layer {i}" for i in range(n_layers)] + ["logits"],
               "showgrid": False, "zeroline": False})
    return finish(fig, theme)


def heads(result: PathPatchingResult, *, values: str = "normalized", title: str | None = None,
          theme: str | go.layout.Template | None = None) -> Figure:
    """Path patching per sender head as a layer x head heatmap, on one diverging scale centred at 0:
    `values` "normalized" (the fraction of clean kept, (score - corrupt) / (clean - corrupt):
    1 leaves the clean run, 0 is fully corrupt) or "change" (score minus the clean score, raw
    units). Hovering shows both and the raw score; heads that feed no receiver are blank. When
    clean and corrupt score the same the fraction is undefined and "change" is drawn instead."""
    if values not in ("normalized", "change"):
        raise NNPatchValueError(f'values={values!r}: use "normalized" or "change"')
    span = result.clean_score - result.corrupt_score
    defined = abs(span) > 1e-6 * max(1.0, abs(result.clean_score), abs(result.corrupt_score))
    shown = values if defined else "change"
    z = _cells(result.heads(result.normalized if shown == "normalized" else result.change))
    kept, change, score = (_cells(result.heads(v)) for v in (
        result.normalized if defined else result.change * math.nan, result.change, result.scores))
    limit = max([abs(v) for row in z for v in row if v is not None], default=0.0)
    limit = max(1.0, limit) if shown == "normalized" else (limit or 1.0)
    hover = [[f"layer {i} h{h}<br>fraction of clean kept {_number(kept[i][h])}<br>change {_number(change[i][h])}"
              f"<br>{result.metric} {_number(score[i][h])}" for h in range(result.n_heads)]
             for i in range(result.n_layers)]
    label = f"fraction of clean kept ({result.metric})" if shown == "normalized" else f"change in {result.metric}"
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"h{h}" for h in range(result.n_heads)], y=[f"layer {i}" for i in range(result.n_layers)],
        colorscale="RdBu", zmid=0.0, zmin=-limit, zmax=limit, colorbar={"title": {"text": label, "side": "right"}},
        text=hover, hovertemplate="%{text}<extra></extra>"))
    receivers = ", ".join(result.receivers[:6]) + (" ..." if len(result.receivers) > 6 else "")
    note = "" if defined else (f"<br><sub>clean and corrupt both score {result.clean_score:.4g}: the fraction is "
                               "undefined, colours show the change</sub>")
    fig.update_layout(title=title or f"path patching -> {receivers} ({result.metric}, {shown}){note}",
                      yaxis={"autorange": "reversed"}, height=120 + 40 * result.n_layers)
    return finish(fig, theme)


def _cells(grid) -> list[list[float | None]]:
    return [[v if math.isfinite(v) else None for v in row] for row in grid.tolist()]


def _number(v: float | None) -> str:
    return "undefined" if v is None else f"{v:.4g}"
