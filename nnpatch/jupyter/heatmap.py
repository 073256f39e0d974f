"""Views of computed `PatchingResult`s: plotly heatmaps, side-by-side comparisons, an
attribution-vs-activation scatter, and a compact text heatmap for terminals.

Every function takes results and returns a plotly `Figure` (or a string); none runs a model or
shows anything.

    >>> import torch, nnpatch
    >>> from nnpatch import heatmap
    >>> r = nnpatch.PatchingResult(torch.tensor([[0.0, 1.0], [0.5, -0.2]]), ("layer", "pos"),
    ...     {"pos": ["Mary", " ran"]}, clean_score=2.0, corrupt_score=0.5, site="resid_pre")
    >>> fig = heatmap.plot(r)                      # fig.show() in a notebook
    >>> print(heatmap.text(r))
         Mary   ran
    L0   0.00  1.00
    L1   0.50 -0.20
    Activation patching of resid_pre by layer x pos (logit_diff, denoise); clean 2, corrupt 0.5
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import NNPatchValueError

if TYPE_CHECKING:  # a result draws itself with plot() below, so this import is for types only
    from ..patching.result import PatchingResult

SCALE = "RdBu"  # diverging; the colour axis is centred at 0


def plot(result: PatchingResult, *, title: str | None = None, height: int | None = None) -> go.Figure:
    """A heatmap of one result: rows are layers (or layer and head), columns positions (or heads).

    Colours are RdBu centred at 0, axis ticks are layer numbers and tokens, and hovering a cell
    shows its site path, label and value.
    """
    grid = _Grid(result)
    limit = _limit([result])
    fig = go.Figure(grid.trace(zmin=-limit, zmax=limit, colorscale=SCALE, colorbar={"title": result.metric}))
    fig.update_layout(title=title or _title(result), height=height or grid.height(),
                      xaxis=grid.xaxis(), yaxis=grid.yaxis(), margin={"l": 80, "r": 20, "t": 60, "b": 60})
    return fig


def compare(results: Sequence[PatchingResult], *, titles: Sequence[str] | None = None,
            height: int | None = None) -> go.Figure:
    """Several results side by side on one shared, zero-centred colour scale.

        >>> import torch, nnpatch
        >>> from nnpatch import heatmap
        >>> act = nnpatch.PatchingResult(torch.tensor([[0.1, 0.9]]), ("layer", "pos"), {}, 2.0, 0.5)
        >>> atp = nnpatch.PatchingResult(torch.tensor([[0.2, 1.3]]), ("layer", "pos"), {}, 2.0, 0.5,
        ...                              method="attribution")
        >>> fig = heatmap.compare([act, atp], titles=["activation", "attribution"])
        >>> fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax
        (-1.2999999523162842, 1.2999999523162842)
    """
    if not results:
        raise NNPatchValueError("compare() needs at least one result")
    titles = list(titles) if titles is not None else [_title(r, short=True) for r in results]
    if len(titles) != len(results):
        raise NNPatchValueError(f"{len(titles)} titles for {len(results)} results")
    fig = make_subplots(rows=1, cols=len(results), subplot_titles=titles, horizontal_spacing=0.06)
    limit = _limit(results)
    grids = [_Grid(r) for r in results]
    for col, grid in enumerate(grids, start=1):
        fig.add_trace(grid.trace(coloraxis="coloraxis"), row=1, col=col)
        fig.update_xaxes(grid.xaxis(), row=1, col=col)
        fig.update_yaxes(grid.yaxis(), row=1, col=col)
    fig.update_layout(coloraxis={"colorscale": SCALE, "cmin": -limit, "cmax": limit, "cmid": 0},
                      height=height or max(g.height() for g in grids), width=None,
                      margin={"l": 80, "r": 20, "t": 60, "b": 60})
    return fig


def scatter(attribution: PatchingResult, activation: PatchingResult, *, title: str | None = None) -> go.Figure:
    """Each cell's attribution estimate against its activation-patching value, with y = x.

        >>> import nnpatch
        >>> from nnpatch import heatmap
        >>> model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(4, template=0)
        >>> fig = heatmap.scatter(nnpatch.attribution_patching(model, pairs, site="attn_out", progress=False),
        ...                       nnpatch.activation_patching(model, pairs, site="attn_out", progress=False))
    """
    if attribution.values.shape != activation.values.shape or attribution.dims != activation.dims:
        raise NNPatchValueError(
            f"scatter() compares the same cells: attribution is {attribution.dims} "
            f"{tuple(attribution.values.shape)} but activation is {activation.dims} "
            f"{tuple(activation.values.shape)}; run both with the same site, by and layers")
    x = activation.values.flatten().tolist()
    y = attribution.values.flatten().tolist()
    names = _cell_names(activation)
    lo, hi = min(x + y), max(x + y)
    corr = _correlation(x, y)
    fig = go.Figure([
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dot", "color": "grey"},
                   name="y = x", hoverinfo="skip"),
        go.Scatter(x=x, y=y, mode="markers", name="cells", text=names, marker={"size": 6},
                   hovertemplate="%{text}<br>activation %{x:.4f}<br>attribution %{y:.4f}<extra></extra>"),
    ])
    fig.update_layout(
        title=title or f"attribution vs activation patching: {activation.site} (r = {corr:.3f})",
        xaxis_title=f"activation patching ({activation.metric})",
        yaxis_title=f"attribution patching ({attribution.metric})", height=500)
    return fig


def text(result: PatchingResult, *, width: int = 6) -> str:
    """A compact text heatmap: one line per row, values to two decimals, tokens as column heads."""
    grid = _Grid(result)
    z = grid.z
    head = max(len(r) for r in grid.row_ticks) + 1
    cols = [_short(c, width - 1) for c in grid.col_ticks]
    lines = [" " * head + "".join(f"{c:>{width}}" for c in cols)]
    for tick, row in zip(grid.row_ticks, z):
        lines.append(f"{tick:<{head}}" + "".join(f"{v:>{width}.2f}" for v in row))
    lines.append(f"{_title(result)}; clean {result.clean_score:.4g}, corrupt {result.corrupt_score:.4g}")
    return "\n".join(lines)


# -- layout of a result as a 2-D grid --------------------------------------------------------------
class _Grid:
    """A result's values as a 2-D grid with tick labels and hover text per cell."""

    def __init__(self, r: PatchingResult):
        v, dims, labels = r.values, r.dims, r.labels
        layers = [str(layer) for layer in r.layers] or labels["layer"]
        paths = labels["layer"]
        if dims == ("layer",):
            self.z = [v.tolist()]
            self.row_ticks, self.col_ticks = [r.site or "value"], [f"L{layer}" for layer in layers]
            self.hover = [[f"layer {layers[i]}: {paths[i]}" for i in range(len(layers))]]
            self.col_title, self.row_title = "layer", ""
        elif dims in (("layer", "pos"), ("layer", "head")):
            other = dims[1]
            self.z = v.tolist()
            self.row_ticks = [f"L{layer}" for layer in layers]
            self.col_ticks = [repr(t)[1:-1] if other == "pos" else f"H{t}" for t in labels[other]]
            self.hover = [[f"layer {layers[i]}: {paths[i]}<br>{other} {j}: {labels[other][j]!r}"
                           for j in range(v.shape[1])] for i in range(v.shape[0])]
            self.col_title, self.row_title = other, "layer"
        elif dims == ("layer", "head", "pos"):
            n_layers, n_heads, _ = v.shape
            self.z = v.reshape(n_layers * n_heads, -1).tolist()
            self.row_ticks = [f"L{layers[i]}H{h}" for i in range(n_layers) for h in range(n_heads)]
            self.col_ticks = [repr(t)[1:-1] for t in labels["pos"]]
            self.hover = [[f"layer {layers[i]} head {h}: {paths[i]}<br>pos {j}: {labels['pos'][j]!r}"
                           for j in range(v.shape[2])] for i in range(n_layers) for h in range(n_heads)]
            self.col_title, self.row_title = "pos", "layer, head"
        else:
            raise NNPatchValueError(f"cannot draw a result with dims {dims}")

    def trace(self, **kwargs) -> go.Heatmap:
        return go.Heatmap(z=self.z, x=list(range(len(self.col_ticks))), y=list(range(len(self.row_ticks))),
                          customdata=self.hover,
                          hovertemplate="%{customdata}<br>value %{z:.4f}<extra></extra>", **kwargs)

    def xaxis(self) -> dict:
        return {"tickmode": "array", "tickvals": list(range(len(self.col_ticks))), "ticktext": self.col_ticks,
                "title": self.col_title, "tickangle": -45 if self.col_title == "pos" else 0}

    def yaxis(self) -> dict:
        return {"tickmode": "array", "tickvals": list(range(len(self.row_ticks))), "ticktext": self.row_ticks,
                "title": self.row_title, "autorange": "reversed"}

    def height(self) -> int:
        return int(min(1200, max(300, 140 + 22 * len(self.row_ticks))))


def _limit(results) -> float:
    m = max(float(r.values.abs().max()) if r.values.numel() else 0.0 for r in results)
    return m if m > 0 and math.isfinite(m) else 1.0


def _title(r: PatchingResult, short: bool = False) -> str:
    if short:
        return f"{r.method}: {r.site}"
    return f"{r.method.capitalize()} patching of {r.site} by {' x '.join(r.dims)} ({r.metric}, {r.direction})"


def _cell_names(r: PatchingResult) -> list[str]:
    import itertools
    axes = [[f"{d} {lab!r}" if d == "pos" else f"{d} {r.layers[i] if d == 'layer' else lab}"
             for i, lab in enumerate(r.labels[d])] for d in r.dims]
    return [", ".join(parts) for parts in itertools.product(*axes)]


def _short(s: str, n: int) -> str:
    s = repr(s)[1:-1]
    return s if len(s) <= n else s[:n - 1] + "~"


def _correlation(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")
