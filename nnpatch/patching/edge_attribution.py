"""Edge attribution patching: a score for every edge of the graph from a few forward and backward
passes (EAP, Syed et al. 2023; EAP-IG, Hanna et al. 2024).

An edge s->r's score estimates how the metric changes when r's input gets s's corrupt output in
place of its clean one: (corrupt_s - clean_s) . dmetric/d(input of r). EAP takes the gradient on
the clean run: per group of prompts, one corrupt forward (kept from the reference runs), one clean
forward and one backward. EAP-IG averages the gradient over `steps` runs whose input embedding
moves from corrupt to clean (alpha = 1/steps, ..., 1), so `steps=1` is EAP.

    >>> import nnpatch
    >>> model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(8, template=0)
    >>> scores = nnpatch.edge_attribution(model, pairs, method="eap-ig", steps=3)
    >>> scores.edges_table()[0]["edge"]  # the edge that matters most
    'input->a0.h3<v>'
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import NNPatchValueError
from .api import _one_at_a_time
from .circuit import Circuit, GraphKey
from .circuit_job import CircuitJob

METHODS = ("eap", "eap-ig")


@_one_at_a_time
def edge_attribution(model, clean, corrupt=None, *, answer=None, wrong=None, method: str = "eap",
                     steps: int = 5, metric: str | Callable = "logit_diff") -> Circuit:
    """Score every edge of `model`'s circuit graph on the prompt pairs; returns a `Circuit` that
    keeps every edge (select with `.top(n)`, `.threshold(t)`, `.greedy(n)`).

    Pairs are given as in `activation_patching` (task pairs, or clean/corrupt prompts with
    answer/wrong). Scores are in the metric's raw units (for "logit_diff": logits), summed over
    positions and averaged over pairs."""
    if method not in METHODS:
        raise NNPatchValueError(f"method {method!r} is unknown; choose 'eap' or 'eap-ig'")
    if int(steps) < 1:
        raise NNPatchValueError(f"steps={steps}: EAP-IG needs at least one step")
    steps = 1 if method == "eap" else int(steps)
    cj = CircuitJob(model, clean, corrupt, answer, wrong, metric, grad=True)
    scores = edge_scores(cj, steps)
    g = cj.graph
    r, s = torch.tensor(g.edge_pairs, dtype=torch.long).reshape(-1, 2).t()
    flat = scores[r, s]  # [edges], in the graph's edge order
    return Circuit(GraphKey.of(g), g.edges, flat, torch.ones(len(g.edges), dtype=torch.bool),
                   method=method, metric=cj.metric_name, clean_score=cj.clean_score,
                   corrupt_score=cj.corrupt_score)


def edge_scores(cj: CircuitJob, steps: int) -> torch.Tensor:
    """Scores `[receivers, senders]` (zero where there is no edge). The last EAP-IG step (alpha 1)
    is the clean run, whose graph the job kept from its reference run."""
    g, edges = cj.graph, cj.edges
    total = torch.zeros(len(g.receivers), len(g.senders))
    for i, (runner, group, clean, corrupt) in enumerate(cj.groups()):
        grads = None
        for k in range(1, steps + 1):
            if k == steps:
                logits, leaves = cj.clean_grad[i]
            else:
                value = corrupt.input + k / steps * (clean.input - corrupt.input)
                with torch.enable_grad():
                    logits, _, leaves = edges.run(cj.forward(runner), group.clean, leaves=True, input_value=value)
            with torch.enable_grad():
                got = torch.autograd.grad(cj.part(logits, group), leaves.tensors, allow_unused=True)
            got = edges.receiver_grads(leaves, list(got))  # [receivers, b, pos, d]
            grads = got if grads is None else grads + got
        if steps > 1:
            grads /= steps
        with torch.no_grad():
            diff = edges.sender_deltas(corrupt, clean).to(grads.dtype)  # [senders, b, pos, d]
        # A matrix product over (pair, position, feature) per layer: its receivers are consecutive
        # rows, their senders a prefix of the sender list (pairs that are no edge are masked below).
        grads, diff = grads.reshape(len(grads), -1), diff.reshape(len(diff), -1)
        start = 0
        for stop in [layer.mlp + 1 for layer in g.layers] + [len(g.receivers)]:
            n = int(g.upstream[start:stop].any(0).nonzero().max()) + 1
            total[start:stop, :n] += (grads[start:stop].float() @ diff[:n].float().t()).cpu()
            start = stop
    return total * g.upstream
def rank_correlation(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float:
    """Spearman's rank correlation of two score lists (ties take their mean rank)."""
    ra, rb = _ranks(torch.as_tensor(a, dtype=torch.float64)), _ranks(torch.as_tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for v in x.unique():
        tie = x == v
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks
