"""How much of the model's behaviour a circuit keeps: the model run with every edge outside the
circuit carrying its corrupt value (`ablation="patch"`) or its mean over the prompts
(`ablation="mean"`), every edge inside it carrying what its sender computes in that same run.

    >>> import nnpatch
    >>> model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(8, template=0)
    >>> scores = nnpatch.edge_attribution(model, pairs)
    >>> result = nnpatch.evaluate_circuit(model, pairs, scores.top(60))
    >>> result.fraction > 0.5
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import NNPatchValueError
from .api import _one_at_a_time
from .circuit import Circuit
from .circuit_job import CircuitJob

ABLATIONS = ("patch", "mean")


@dataclass
class CircuitScore:
    """A circuit's metric, its fraction of the full model's (`score / clean_score`), and the
    normalised score (corrupt 0, clean 1)."""

    score: float
    clean_score: float
    corrupt_score: float
    n_edges: int
    ablation: str
    metric: str

    @property
    def fraction(self) -> float:
        return self.score / self.clean_score if self.clean_score else math.nan

    @property
    def normalized(self) -> float:
        span = self.clean_score - self.corrupt_score
        return (self.score - self.corrupt_score) / span if span else math.nan


@_one_at_a_time
def evaluate_circuit(model, clean, corrupt=None, circuit: Circuit | list[Circuit] | None = None, *,
                     answer=None, wrong=None, ablation: str = "patch",
                     metric: str | Callable = "logit_diff") -> CircuitScore | list[CircuitScore]:
    """The metric of `model` on the pairs with only `circuit`'s edges intact (see the module doc).

    `circuit` must come from this model's graph (`edge_attribution(...).top(n)`, or `Circuit.load`).
    A list of circuits is evaluated in batched runs and gives a list of scores."""
    if circuit is None and (isinstance(corrupt, Circuit) or (
            isinstance(corrupt, (list, tuple)) and corrupt and all(isinstance(c, Circuit) for c in corrupt))):
        circuit, corrupt = corrupt, None  # evaluate_circuit(model, task_pairs, circuit)
    many = isinstance(circuit, (list, tuple))
    circuits = list(circuit) if many else ([] if circuit is None else [circuit])
    bad = [type(c).__name__ for c in circuits if not isinstance(c, Circuit)]
    if bad or not circuits:
        raise NNPatchValueError("evaluate_circuit needs circuit=<a Circuit or a list of them> (e.g. "
                                f"nnpatch.edge_attribution(model, pairs).top(50)), got {bad or 'none'}")
    cj = CircuitJob(model, clean, corrupt, answer, wrong, metric)
    scores = score_circuits(cj, circuits, ablation)
    return scores if many else scores[0]


def score_circuits(cj: CircuitJob, circuits: list[Circuit], ablation: str) -> list[CircuitScore]:
    """Each circuit's score on the job's pairs; circuits of one group run batched together."""
    if ablation not in ABLATIONS:
        raise NNPatchValueError(f"ablation {ablation!r} is unknown; choose 'patch' (corrupt values) or 'mean'")
    g = cj.graph
    masks = []
    for c in circuits:
        c.check_graph(g)
        kept = torch.zeros(len(g.receivers), len(g.senders), dtype=torch.bool)
        r, s = torch.tensor(g.edge_pairs).t() if g.edge_pairs else (torch.zeros(0, dtype=torch.long),) * 2
        kept[r, s] = c.kept
        masks.append(g.upstream & ~kept)  # [receivers, senders]: the edges that get ablated
    totals = torch.zeros(len(circuits))
    for i, (runner, group, clean, corrupt) in enumerate(cj.groups()):
        source = corrupt if ablation == "patch" else cj.mean_outputs(i)
        n = group.n
        for start in range(0, len(circuits), max(1, 64 // n)):
            chunk = masks[start:start + max(1, 64 // n)]
            k = len(chunk)
            mask = torch.stack(chunk).repeat_interleave(n, 0).to(group.clean.device)  # [k*n, R, S]
            ids = group.clean.repeat(k, 1)
            src = source.map(lambda t: None if t is None else (t if t.shape[0] == 1 else t.repeat(k, *[1] * (t.dim() - 1))))
            with torch.no_grad():
                logits, _, _ = cj.edges.run(cj.forward(runner), ids, source=src, mask=mask)
            stats = cj.row_stats(logits, group, list(range(n)) * k).float().cpu()
            totals[start:start + k] += stats.reshape(k, n).sum(1)
    return [CircuitScore(float(t) / cj.job.n_pairs, cj.clean_score, cj.corrupt_score, len(c), ablation,
                         cj.metric_name) for t, c in zip(totals, circuits)]


@_one_at_a_time
def smallest_circuit(model, clean, corrupt=None, scores: Circuit | None = None, *, answer=None, wrong=None,
                     fraction: float = 0.9, ablation: str = "patch", selection: str = "top",
                     metric: str | Callable = "logit_diff") -> tuple[Circuit, CircuitScore]:
    """The smallest `scores.top(n)` (or `.greedy(n)`) keeping at least `fraction` of the clean
    metric, found by bisection on n (the fraction grows with n, though not strictly, so the answer
    is the smallest n bisection meets, checked to reach the fraction)."""
    if scores is None and isinstance(corrupt, Circuit):
        scores, corrupt = corrupt, None
    if selection not in ("top", "greedy"):
        raise NNPatchValueError(f"selection {selection!r}: choose 'top' or 'greedy'")
    cj = CircuitJob(model, clean, corrupt, answer, wrong, metric)
    pick = getattr(scores, selection)

    def ok(n):
        res = score_circuits(cj, [pick(n)], ablation)[0]
        return res.fraction >= fraction, res
    total = len(scores.edges)
    good, res = ok(total)
    if not good:
        raise NNPatchValueError(f"even all {total} edges keep only {res.fraction:.3f} of the metric")
    lo, hi, best = 1, total, res
    while lo < hi:
        mid = (lo + hi) // 2
        good, res = ok(mid)
        if good:
            hi, best = mid, res
        else:
            lo = mid + 1
    return pick(hi), best
