"""What every circuit method starts from: the sweep's checked inputs, the model's graph, and the
clean and corrupt reference runs of each group of prompt pairs (one token length each).

The prompts, answer tokens and metric are a sweep's `Job` (direction "noise": the clean run is
the one rewritten, the corrupt run supplies values); each group runs through the sweep's
`Runner` forward (only the last position's logits are computed).
"""
from __future__ import annotations

import torch

from ..errors import NNPatchTypeError
from .edge_run import EdgeRun, Outputs
from .graph import Graph
from .job import Group, Job
from .runner import Runner


class CircuitJob:
    def __init__(self, model, clean, corrupt, answer, wrong, metric, *, grad: bool = False):
        """With `grad`, the clean reference runs keep their graph and receiver leaves
        (`self.clean_grad`: per group (logits, Leaves)) for a backward pass later."""
        self.job = Job(model, clean, corrupt, answer, wrong, metric, "resid_pre", ("layer",), "noise", None)
        self.module = self.job.module
        self.graph = Graph(self.module)
        self.edges = EdgeRun(self.graph, self.module)
        self.runners = [Runner(self.job, g) for g in self.job.groups]
        self.clean: list[Outputs] = []
        self.corrupt: list[Outputs] = []
        self.clean_grad: list = []
        for runner in self.runners:
            with torch.enable_grad() if grad else torch.no_grad():
                clean_logits, clean_out, leaves = self.edges.run(self.forward(runner), runner.group.clean,
                                                                 capture=True, leaves=grad)
            if grad:
                self.clean_grad.append((clean_logits, leaves))
            with torch.no_grad():
                corrupt_logits, corrupt_out, _ = self.edges.run(self.forward(runner), runner.group.corrupt, capture=True)
            runner.set_scores(corrupt_logits.detach(), clean_logits.detach())
            self.clean.append(clean_out)
            self.corrupt.append(corrupt_out)
        self.clean_score, self.corrupt_score = self.job.scores(self.runners)

    @property
    def metric_name(self) -> str:
        return self.job.metric.name

    @staticmethod
    def forward(runner: Runner):
        return lambda ids: runner._forward(ids, want_cache=False)[0]  # [rows, vocab]

    def groups(self):
        """(runner, group, clean Outputs, corrupt Outputs) per group."""
        return [(r, r.group, c, k) for r, c, k in zip(self.runners, self.clean, self.corrupt)]

    def row_stats(self, logits: torch.Tensor, group: Group, pairs: list[int]) -> torch.Tensor:
        """The metric's per-row statistic `[rows]` of rows that are copies of the group's `pairs`."""
        if self.job.metric.fn is not None:
            raise NNPatchTypeError("circuit methods need a named metric (e.g. 'logit_diff'); a metric "
                                   "function of the logits cannot be split into per-row scores")
        return self.job.metric.row_stats(logits, group, pairs)

    def part(self, logits: torch.Tensor, group: Group) -> torch.Tensor:
        """The group's share of the metric (differentiable): the metric is the sum of the shares."""
        if self.job.metric.fn is not None and len(self.runners) > 1:
            raise NNPatchTypeError("a metric function needs all prompt pairs to have the same token length "
                                   "for circuit methods; use a named metric such as 'logit_diff'")
        return self.job.metric.aggregate_runs([(group, logits)])

    def mean_outputs(self, i: int) -> Outputs:
        """Every sender's output averaged over the group's clean and corrupt prompts, per position."""
        both = (self.clean[i], self.corrupt[i])
        mean = Outputs()
        mean.input = torch.cat([o.input for o in both]).mean(0, keepdim=True)
        mean.z = [torch.cat([o.z[k] for o in both]).mean(0, keepdim=True) for k in range(self.graph.n_layers)]
        mean.mlp = [torch.cat([o.mlp[k] for o in both]).mean(0, keepdim=True) for k in range(self.graph.n_layers)]
        return mean
