"""Figures of what `nnpatch.patching.inspect` computes: attention patterns, heads' direct logit
attribution and the logit lens. Each function takes computed values and returns a plotly
`Figure`; none runs a model.

    >>> import nnpatch
    >>> from nnpatch.jupyter import inspect_plots
    >>> model = nnpatch.models.load("ioi")
    >>> clean = "When Mary and John went to the store, John gave a drink to"
    >>> corrupt = "When Mary and John went to the store, Mary gave a drink to"
    >>> fig = inspect_plots.attention([nnpatch.attention_pattern(model, clean, 2, 1),
    ...                                nnpatch.attention_pattern(model, corrupt, 2, 1)], titles=["clean", "corrupt"])
    >>> fig.data[0].y[-1]
    "' to' 13"
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..errors import NNPatchValueError
from .figures import CONFIG, Figure, finish
from .heatmap import SCALE

if TYPE_CHECKING:  # the figures take computed values; these imports are for annotations only
    from ..patching.inspect import AttentionPattern, LogitLens

__all__ = ["CONFIG", "token_labels", "attention", "logit_attribution", "logit_lens"]
ATTENTION_SCALE = "Blues"  # attention weights lie in [0, 1]
LENS_SCALE = "Viridis"


def token_labels(tokens: Sequence[str]) -> list[str]:
    """Each token with its position, as the axes show it: `' to' 13`."""
    return [f"{t!r} {i}" for i, t in enumerate(tokens)]


def attention(patterns: Sequence[AttentionPattern], *, titles: Sequence[str] | None = None,
              theme: str | go.layout.Template | None = None) -> Figure:
    """Attention patterns side by side (query rows, key columns) on one 0-1 scale. Cells above the
    diagonal (keys after the query, which a causal model never attends to) are left blank.
    `theme` is as in `heatmap.plot` ("auto", "light", "dark")."""
    patterns = list(patterns)
    if not patterns:
        raise NNPatchValueError("attention() needs at least one pattern")
    titles = list(titles) if titles is not None else [f"layer {p.layer}, head {p.head}" for p in patterns]
    fig = make_subplots(rows=1, cols=len(patterns), subplot_titles=titles, horizontal_spacing=0.12)
    for col, p in enumerate(patterns, start=1):
        w = p.weights.float()
        causal = torch.ones_like(w, dtype=torch.bool).tril()
        z = [[float(v) if keep else None for v, keep in zip(row, mask)]
             for row, mask in zip(w.tolist(), causal.tolist())]
        labels = token_labels(p.tokens)
        fig.add_trace(go.Heatmap(
            z=z, x=labels, y=labels, coloraxis="coloraxis", xgap=1, ygap=1,
            hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title="key", tickangle=-45, type="category", row=1, col=col)
        fig.update_yaxes(title="query", autorange="reversed", type="category", row=1, col=col)
    n = max(len(p.tokens) for p in patterns)
    fig.update_layout(coloraxis={"colorscale": ATTENTION_SCALE, "cmin": 0, "cmax": 1,
                                 "colorbar": {"title": "attention"}},
                      height=int(min(900, max(320, 160 + 18 * n))), margin={"l": 80, "r": 20, "t": 60, "b": 80})
    return finish(fig, theme)


def logit_attribution(values: torch.Tensor, *, answer: str = "answer", wrong: str = "wrong",
                      title: str | None = None, mark: tuple[int, int] | None = None,
                      theme: str | go.layout.Template | None = None) -> Figure:
    """Heads' direct logit attribution `[layers, heads]` as a layer x head heatmap, centred at 0;
    `mark` outlines one (layer, head)."""
    values = torch.as_tensor(values).float()
    if values.dim() != 2:
        raise NNPatchValueError(f"logit_attribution() takes [layers, heads] values, got shape {tuple(values.shape)}")
    limit = float(values.abs().max()) or 1.0
    what = f"logit({answer!r}) - logit({wrong!r})"
    fig = go.Figure(go.Heatmap(
        z=values.tolist(), x=[f"H{h}" for h in range(values.shape[1])], y=[f"L{i}" for i in range(values.shape[0])],
        zmin=-limit, zmax=limit, colorscale=SCALE, colorbar={"title": "direct<br>effect"},
        hovertemplate="layer %{y}, head %{x}<br>direct effect %{z:.4f}<extra></extra>"))
    if mark is not None:
        layer, head = mark
        fig.add_shape(type="rect", x0=head - 0.5, x1=head + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                      line={"color": "#e8590c", "width": 3})
    fig.update_layout(title=title or f"Direct effect of each head on {what}",
                      xaxis={"title": "head"}, yaxis={"title": "layer", "autorange": "reversed"},
                      height=int(min(700, max(260, 140 + 26 * values.shape[0]))),
                      margin={"l": 60, "r": 20, "t": 60, "b": 50})
    return finish(fig, theme)


def logit_lens(lenses: LogitLens | Sequence[LogitLens], *, titles: Sequence[str] | None = None,
               theme: str | go.layout.Template | None = None) -> Figure:
    """Logit-lens grids, one above the other: each cell is a position's top token after a layer
    (text), coloured by the answer's probability (by the top token's without an answer); hover
    shows both."""
    lenses = [lenses] if not isinstance(lenses, (list, tuple)) else list(lenses)
    if not lenses:
        raise NNPatchValueError("logit_lens() needs at least one lens")
    titles = list(titles) if titles is not None else [lens.patch or "run" for lens in lenses]
    rows = sum(len(lens.layers) for lens in lenses)
    height = int(min(1600, 60 + 150 * len(lenses) + 24 * rows))
    # each grid's rotated token labels and the next grid's title need about 110 px between grids
    fig = make_subplots(rows=len(lenses), cols=1, subplot_titles=titles,
                        vertical_spacing=min(0.3, 110 / height) if len(lenses) > 1 else 0.0)
    answer = next((lens.answer for lens in lenses if lens.answer is not None), None)
    for row, lens in enumerate(lenses, start=1):
        colour = lens.answer_probs if lens.answer_probs is not None else lens.top_probs
        answer_p = lens.answer_probs.tolist() if lens.answer_probs is not None else None
        hover = [[f"top {tok!r} p={p:.3f}" + ("" if answer_p is None else f"<br>{lens.answer!r} p={answer_p[i][j]:.3f}")
                  for j, (tok, p) in enumerate(zip(toks, probs))]
                 for i, (toks, probs) in enumerate(zip(lens.top_tokens, lens.top_probs.tolist()))]
        fig.add_trace(go.Heatmap(
            z=colour.tolist(), x=token_labels(lens.tokens), y=[f"L{x}" if x != "embed" else x for x in lens.layers],
            text=[[repr(t)[1:-1] for t in toks] for toks in lens.top_tokens], texttemplate="%{text}",
            customdata=hover, coloraxis="coloraxis", xgap=1, ygap=1,
            hovertemplate="%{y} · %{x}<br>%{customdata}<extra></extra>"), row=row, col=1)
        fig.update_xaxes(type="category", tickangle=-45, row=row, col=1)
        fig.update_yaxes(type="category", autorange="reversed", row=row, col=1)
    bar = f"p({answer!r})" if answer is not None else "p(top token)"
    fig.update_layout(coloraxis={"colorscale": LENS_SCALE, "cmin": 0, "cmax": 1, "colorbar": {"title": bar}},
                      height=height,
                      margin={"l": 60, "r": 20, "t": 50, "b": 60})
    return finish(fig, theme)
