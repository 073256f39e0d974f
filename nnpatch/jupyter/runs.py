"""The workbench's runs: each sweep with the settings it ran on, the session's history of them,
and for a run over a whole task, each pair's own sweep and the spread across pairs.

No widget here: `WorkbenchController` keeps a `History` of `Run`s, and the view shows them.

    >>> import torch, nnpatch
    >>> from nnpatch.jupyter.runs import History, Run, spread
    >>> r = nnpatch.PatchingResult(torch.tensor([[0.0, 1.0]]), ("layer", "pos"), {}, 2.0, 0.5)
    >>> history = History()
    >>> history.add(Run("first settings", r)).index, history.add(Run("second", r)).index
    (0, 1)
    >>> history.back().settings, history.can_back, history.can_forward
    ('first settings', False, True)
    >>> low, high, std = spread([r, r])
    >>> float(high[0, 1]), float(std[0, 1])
    (1.0, 0.0)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import NNPatchError, NNPatchIndexError


@dataclass
class Run:
    """One sweep as the workbench ran it: its settings, its `PatchingResult`, and for a run over
    every pair of the task (`settings.all_pairs`), each pair's own result in pair order."""

    settings: Any
    result: Any
    per_pair: list = field(default_factory=list)
    seconds: float = 0.0


class History:
    """The runs of a session, oldest first, and the one on screen (`index`)."""

    def __init__(self):
        self.runs: list[Run] = []
        self.index = -1

    @property
    def current(self) -> Run | None:
        return self.runs[self.index] if self.runs else None

    @property
    def can_back(self) -> bool:
        return self.index > 0

    @property
    def can_forward(self) -> bool:
        return 0 <= self.index < len(self.runs) - 1

    def add(self, run: Run) -> History:
        """Append `run` and show it (runs after the shown one stay: a history, not an undo stack)."""
        self.runs.append(run)
        self.index = len(self.runs) - 1
        return self

    def back(self) -> Run:
        if not self.can_back:
            raise NNPatchError("this is the first run of the session: there is no earlier run to go back to")
        self.index -= 1
        return self.runs[self.index]

    def forward(self) -> Run:
        if not self.can_forward:
            raise NNPatchError("this is the latest run: there is no later run to go forward to")
        self.index += 1
        return self.runs[self.index]

    def run(self, i: int) -> Run:
        if not 0 <= i < len(self.runs):
            raise NNPatchIndexError(f"run {i + 1} does not exist: the session has {len(self.runs)} runs")
        return self.runs[i]


def spread(per_pair: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(min, max, std) across pairs of each cell's value, from each pair's own result.

    The std is the population std (0 for one pair). Each pair's values are normalised by its own
    clean and corrupt scores, so their mean is not the batched result, which normalises the
    pairs' mean; `pooled` recovers that one from the same per-pair results."""
    values = torch.stack([r.values for r in per_pair])  # [pairs, *cells]
    return values.min(0).values, values.max(0).values, values.std(0, unbiased=False)


def pooled(per_pair: list, normalized: bool) -> torch.Tensor:
    """The batched sweep's values, rebuilt from each pair's result: the metric's mean over pairs,
    normalised (for a normalised metric) by the pairs' mean clean and corrupt scores."""
    clean = torch.tensor([r.clean_score for r in per_pair], dtype=torch.float64)
    corrupt = torch.tensor([r.corrupt_score for r in per_pair], dtype=torch.float64)
    values = torch.stack([r.values.double() for r in per_pair])  # [pairs, *cells]
    if not normalized:
        return values.mean(0)
    shape = (-1,) + (1,) * (values.dim() - 1)
    raw = corrupt.view(shape) + values * (clean - corrupt).view(shape)  # each pair's patched score
    return (raw.mean(0) - corrupt.mean()) / (clean.mean() - corrupt.mean())


class Progress:
    """One progress callback over several sweeps run one after another (`parts` of them)."""

    def __init__(self, report, parts: int):
        self.report, self.parts = report, parts

    def part(self, i: int):
        if self.report is None:
            return None
        def report(done: int, total: int) -> None:
            fraction = done / total if total else 1.0
            self.report(round(1000 * (i + fraction)), 1000 * self.parts)
        return report


def as_grid(fig, n: int, cols: int = 4, row_height: int = 260):
    """Re-lay a one-row figure of `n` subplots (`heatmap.compare`) as rows of `cols`, so that
    many small heatmaps stay readable: each subplot's axes get a cell of the grid and its title
    follows it, and its position labels thin out and stand upright (slanted ones would run into
    the neighbouring heatmap's)."""
    rows = -(-n // cols)
    for k in range(n if n > 1 else 0):
        _upright_ticks(fig.layout[f"xaxis{'' if k == 0 else k + 1}"])
    if rows <= 1:
        return fig
    height = rows * row_height + 80
    below, above, gap_x = 110 / height, 30 / height, 0.04  # room for position ticks, and for the title
    titles = list(fig.layout.annotations or ())
    for k in range(n):
        row, col = divmod(k, cols)
        x = [col / cols + gap_x / 2, (col + 1) / cols - gap_x / 2]
        y = [1 - (row + 1) / rows + below, 1 - row / rows - above]
        suffix = "" if k == 0 else str(k + 1)
        fig.layout[f"xaxis{suffix}"].update(domain=x, title_text=None if row < rows - 1 else fig.layout[f"xaxis{suffix}"].title.text)
        fig.layout[f"yaxis{suffix}"].update(domain=y, title_text=None if col else fig.layout[f"yaxis{suffix}"].title.text)
        if k < len(titles):
            titles[k].update(x=sum(x) / 2, y=y[1], xanchor="center", yanchor="bottom")
    fig.update_layout(height=height)
    return fig


GRID_TICKS = 5
"""The most labelled positions of one small heatmap in `as_grid` (the last one always is)."""


def _upright_ticks(axis) -> None:
    """A small heatmap's position labels: at most GRID_TICKS, written downwards. Labels slanted
    at -45 degrees reach left past the heatmap, under the labels of its left neighbour."""
    values, text = list(axis.tickvals or ()), list(axis.ticktext or ())
    if len(values) > GRID_TICKS:
        k = -(-len(values) // GRID_TICKS)
        keep = list(range(0, len(values) - 1, k))
        if len(values) - 1 - keep[-1] <= k / 2 and len(keep) > 1:
            keep.pop()  # too close to the last label, which always shows (the prediction's position)
        keep.append(len(values) - 1)
        values, text = [values[i] for i in keep], [text[i] for i in keep]
    axis.update(tickvals=values, ticktext=text, tickfont_size=10, tickangle=90 if axis.tickangle else axis.tickangle)
