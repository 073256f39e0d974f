"""Views of computed `PatchingResult`s: plotly heatmaps, side-by-side comparisons, an
attribution-vs-activation scatter, and a compact text heatmap for terminals.

Every figure draws a cell as the fraction of the clean behaviour it restores,
(value - corrupt) / (clean - corrupt), whatever the metric: 0 is the corrupt run, 1 the clean
run, on one diverging scale centred at 0 that always spans -1 to 1; hovering a cell shows the
metric's raw value beside it. Every function takes results and returns a plotly `Figure` (or a
string); none runs a model or shows anything. Figures fill their container's width, carry no
plotly logo or cloud button (`CONFIG`) and take `theme="auto" | "light" | "dark"`
(`set_theme` for all of them).

    >>> import torch, nnpatch
    >>> from nnpatch import heatmap
    >>> r = nnpatch.PatchingResult(torch.tensor([[0.0, 1.0], [0.5, -0.2]]), ("layer", "pos"),
    ...     {"pos": ["Mary", " ran"]}, clean_score=2.0, corrupt_score=0.5, site="resid_pre")
    >>> fig = heatmap.plot(r)                      # fig.show() in a notebook
    >>> fig.data[0].colorbar.title.text
    'fraction of clean restored (logit_diff)'
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
import torch
from plotly.subplots import make_subplots

from ..errors import NNPatchValueError
from .figures import CONFIG, THEMES, Figure, finish, set_theme, template

if TYPE_CHECKING:  # a result draws itself with plot() below, so this import is for types only
    from ..patching.result import PatchingResult

__all__ = ["CONFIG", "THEMES", "Figure", "plot", "compare", "scatter", "text", "set_theme", "template"]

SCALE = "RdBu"  # diverging; the colour axis is centred at 0
MAX_TICKS = 32  # more positions (or rows) than this: label every k-th one


def plot(result: PatchingResult, *, title: str | None = None, height: int | None = None,
         theme: str | go.layout.Template | None = None) -> Figure:
    """A heatmap of one result: rows are layers (or "L3.H2" for layer and head), columns
    positions (`' to' 13`: token and index) or heads.

    Colours show the fraction restored (see the module doc), RdBu centred at 0; the colour bar
    says so. When clean and corrupt score the same the fraction is undefined: the colours show
    the raw metric instead and the title says why.
    """
    grid, scaled = _Grid(result), _Scaled(result)
    limit = _limit([scaled])
    fig = go.Figure(grid.trace(scaled, zmin=scaled.centre - limit, zmax=scaled.centre + limit,
                               zmid=scaled.centre, colorscale=SCALE, colorbar=_colorbar(scaled.label)))
    fig.update_layout(title=(title or _title(result)) + scaled.note, height=height or grid.height(),
                      xaxis=grid.xaxis(), yaxis=grid.yaxis(), margin={"l": 80, "r": 20, "t": 60, "b": 60})
    return finish(fig, theme)


def compare(results: Sequence[PatchingResult], *, titles: Sequence[str] | None = None,
            height: int | None = None, theme: str | go.layout.Template | None = None) -> Figure:
    """Several results side by side on one shared colour scale of the fraction restored.

        >>> import torch, nnpatch
        >>> from nnpatch import heatmap
        >>> act = nnpatch.PatchingResult(torch.tensor([[0.1, 0.9]]), ("layer", "pos"), {}, 2.0, 0.5)
        >>> atp = nnpatch.PatchingResult(torch.tensor([[0.2, 1.3]]), ("layer", "pos"), {}, 2.0, 0.5,
        ...                              method="attribution")
        >>> fig = heatmap.compare([act, atp], titles=["activation", "attribution"])
        >>> fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax
        (-1.2999999523162842, 1.2999999523162842)

    A result whose clean and corrupt runs score the same has no fraction restored: its panel
    stays blank and its title says so.
    """
    if not results:
        raise NNPatchValueError("compare() needs at least one result")
    titles = list(titles) if titles is not None else [_title(r, short=True) for r in results]
    if len(titles) != len(results):
        raise NNPatchValueError(f"{len(titles)} titles for {len(results)} results")
    scaled = [_Scaled(r, fraction_only=True) for r in results]
    titles = [t + ("" if s.fraction else " (undefined: clean = corrupt)") for t, s in zip(titles, scaled)]
    fig = make_subplots(rows=1, cols=len(results), subplot_titles=titles, horizontal_spacing=0.06)
    limit = _limit(scaled)
    grids = [_Grid(r) for r in results]
    for col, (grid, s) in enumerate(zip(grids, scaled), start=1):
        fig.add_trace(grid.trace(s, coloraxis="coloraxis"), row=1, col=col)
        fig.update_xaxes(grid.xaxis(), row=1, col=col)
        fig.update_yaxes(grid.yaxis(), row=1, col=col)
    metrics = sorted({r.metric for r in results})
    fig.update_layout(coloraxis={"colorscale": SCALE, "cmin": -limit, "cmax": limit, "cmid": 0,
                                 "colorbar": _colorbar(_fraction_label(", ".join(metrics)))},
                      height=height or max(g.height() for g in grids),
                      margin={"l": 80, "r": 20, "t": 60, "b": 60})
    return finish(fig, theme)


def scatter(attribution: PatchingResult, activation: PatchingResult, *, title: str | None = None,
            theme: str | go.layout.Template | None = None) -> Figure:
    """Each cell's attribution estimate against its activation-patching value (fractions
    restored, raw values on hover), with y = x.

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
    xs, ys = _Scaled(activation), _Scaled(attribution)
    x, y = _finite(xs.z.flatten().tolist()), _finite(ys.z.flatten().tolist())
    names = _cell_names(activation)
    hover = [f"{n}<br>activation {_number(a, xs.fraction)} ({activation.metric} {_number(ra)})"
             f"<br>attribution {_number(b, ys.fraction)} ({attribution.metric} {_number(rb)})"
             for n, a, b, ra, rb in zip(names, x, y, activation.raw().flatten().tolist(),
                                         attribution.raw().flatten().tolist())]
    known = [v for v in x + y if v is not None]
    lo, hi = min(known, default=0.0), max(known, default=1.0)
    corr = _correlation(*zip(*[(a, b) for a, b in zip(x, y) if a is not None and b is not None])) \
        if any(a is not None and b is not None for a, b in zip(x, y)) else float("nan")
    fig = go.Figure([
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dot", "color": "grey"},
                   name="y = x", hoverinfo="skip"),
        go.Scatter(x=x, y=y, mode="markers", name="cells", text=hover, marker={"size": 6},
                   hovertemplate="%{text}<extra></extra>"),
    ])
    fig.update_layout(
        title=(title or f"attribution vs activation patching: {activation.site} (r = {corr:.3f})")
        + xs.note + ys.note,
        xaxis_title=f"activation patching: {xs.label}", yaxis_title=f"attribution patching: {ys.label}",
        height=500)
    return finish(fig, theme)


def text(result: PatchingResult, *, width: int = 6) -> str:
    """A compact text heatmap: one line per row, values to two decimals, tokens as column heads."""
    grid = _Grid(result)
    z = result.values.reshape(grid.rows, grid.cols).tolist()
    head = max(len(r) for r in grid.row_ticks) + 1
    cols = [_short(c, width - 1) for c in grid.col_names]
    lines = [" " * head + "".join(f"{c:>{width}}" for c in cols)]
    for tick, row in zip(grid.row_ticks, z):
        lines.append(f"{tick:<{head}}" + "".join(f"{v:>{width}.2f}" for v in row))
    lines.append(f"{_title(result)}; clean {result.clean_score:.4g}, corrupt {result.corrupt_score:.4g}")
    return "\n".join(lines)


# -- what the colours show ---------------------------------------------------------------------
class _Scaled:
    """A result's values as they are drawn: the fraction restored, or, when clean and corrupt
    score the same, the raw metric (unless `fraction_only`: then nothing)."""

    def __init__(self, r: PatchingResult, fraction_only: bool = False):
        self.fraction = r.span_defined
        self.raw = r.raw()
        if self.fraction:
            self.z, self.centre, self.label = r.restored(), 0.0, _fraction_label(r.metric)
            self.note = ""
        else:
            self.z = self.raw if not fraction_only else r.restored()
            self.centre = 0.0 if fraction_only else float(r.corrupt_score)
            self.label = f"{r.metric} (raw; fraction undefined)"
            self.note = (f"<br><sub>clean and corrupt both score {r.corrupt_score:.4g}: the fraction restored is "
                         f"undefined, colours show raw {r.metric} centred there</sub>")
            if not fraction_only and not bool(torch.isfinite(self.raw).any()):
                self.note = (f"<br><sub>clean and corrupt both score {r.corrupt_score:.4g}: the fraction restored "
                             f"is undefined and this result keeps only normalised values (blank); rerun with "
                             f"metric='{r.metric}_raw' to see raw values</sub>")
        blank = int((~torch.isfinite(self.z)).sum())
        if blank and self.fraction:
            self.note += f"<br><sub>{blank} cell(s) undefined (blank)</sub>"


def _colorbar(title: str) -> dict:
    return {"title": {"text": title, "side": "right"}}  # along the bar: the plot keeps its width


def _fraction_label(metric: str) -> str:
    return f"fraction of clean restored ({metric})"


# -- layout of a result as a 2-D grid --------------------------------------------------------------
class _Grid:
    """A result's cells as a 2-D grid (rows x columns) with tick labels and hover text per cell."""

    def __init__(self, r: PatchingResult):
        v, dims, labels = r.values, r.dims, r.labels
        self.metric = r.metric
        layers = [str(layer) for layer in r.layers] or labels["layer"]
        paths = labels["layer"]
        pos_ticks = [f"{t!r} {j}" for j, t in enumerate(labels.get("pos", []))]
        self.col_names = [repr(t)[1:-1] for t in labels.get("pos", [])]  # the text heatmap's heads
        if dims == ("layer",):
            self.rows, self.cols = 1, v.shape[0]
            self.row_ticks, self.col_ticks = [r.site or "value"], [f"L{layer}" for layer in layers]
            self.col_names = self.col_ticks
            self.where = [[f"layer {layers[i]}: {paths[i]}" for i in range(len(layers))]]
            self.col_title, self.row_title = "layer", ""
        elif dims in (("layer", "pos"), ("layer", "head")):
            other = dims[1]
            self.rows, self.cols = v.shape
            self.row_ticks = [f"L{layer}" for layer in layers]
            self.col_ticks = pos_ticks if other == "pos" else [f"H{t}" for t in labels[other]]
            self.col_names = self.col_names if other == "pos" else self.col_ticks
            self.where = [[f"layer {layers[i]}: {paths[i]}<br>{other} {j}: {labels[other][j]!r}"
                           for j in range(v.shape[1])] for i in range(v.shape[0])]
            self.col_title, self.row_title = other, "layer"
        elif dims == ("layer", "head", "pos"):
            n_layers, n_heads, n_pos = v.shape
            self.rows, self.cols = n_layers * n_heads, n_pos
            self.row_ticks = [f"L{layers[i]}.H{h}" for i in range(n_layers) for h in range(n_heads)]
            self.col_ticks = pos_ticks
            self.where = [[f"layer {layers[i]} head {h}: {paths[i]}<br>pos {j}: {labels['pos'][j]!r}"
                           for j in range(n_pos)] for i in range(n_layers) for h in range(n_heads)]
            self.col_title, self.row_title = "pos", "layer.head"
        else:
            raise NNPatchValueError(f"cannot draw a result with dims {dims}")

    def cells(self, t) -> list[list[float | None]]:
        """A tensor of the result's shape as rows x columns, NaN and infinities as None (blank)."""
        return [[v if math.isfinite(v) else None for v in row] for row in t.reshape(self.rows, self.cols).tolist()]

    def trace(self, scaled: _Scaled, **kwargs) -> go.Heatmap:
        z, raw = self.cells(scaled.z), self.cells(scaled.raw)
        shown = "restored" if scaled.fraction else f"{self.metric} (raw)"
        hover = [[f"{self.where[i][j]}<br>{shown} {_number(z[i][j], scaled.fraction)}"
                  + (f"<br>{self.metric} {_number(raw[i][j])}" if scaled.fraction else "")
                  for j in range(self.cols)] for i in range(self.rows)]
        return go.Heatmap(z=z, x=list(range(self.cols)), y=list(range(self.rows)), customdata=raw,
                          text=hover, hovertemplate="%{text}<extra></extra>", **kwargs)

    def xaxis(self) -> dict:
        shown = _thin(len(self.col_ticks))
        return {"tickmode": "array", "tickvals": shown, "ticktext": [self.col_ticks[i] for i in shown],
                "title": self.col_title, "tickangle": -45 if self.col_title == "pos" else 0}

    def yaxis(self) -> dict:
        shown = _thin(len(self.row_ticks))
        return {"tickmode": "array", "tickvals": shown, "ticktext": [self.row_ticks[i] for i in shown],
                "title": self.row_title, "autorange": "reversed"}

    def height(self) -> int:
        return int(min(1200, max(340, 200 + 26 * len(self.row_ticks))))


def _thin(n: int) -> list[int]:
    """Which of n ticks to label: all of up to MAX_TICKS, else every k-th and the last (the
    prediction's position)."""
    k = max(1, math.ceil(n / MAX_TICKS))
    shown = list(range(0, n, k))
    if shown and shown[-1] != n - 1:
        if n - 1 - shown[-1] < k / 2 and len(shown) > 1:
            shown.pop()  # too close to the last one: its label would overlap
        shown.append(n - 1)
    return shown


def _limit(scaled: Sequence[_Scaled]) -> float:
    """Half the colour range: at least 1 (the clean run) for fractions, else the largest
    distance from the centre."""
    far = [abs(v - s.centre) for s in scaled for v in s.z.flatten().tolist() if math.isfinite(v)]
    m = max(far, default=0.0)
    if all(s.fraction for s in scaled):
        return max(1.0, m)
    return m if m > 0 else 1.0


def _number(v: float | None, fraction: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "undefined"
    return f"{round(v, 3) + 0.0:.3f}" if fraction else f"{v:.4g}"  # + 0.0: no "-0.000"


def _finite(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


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
