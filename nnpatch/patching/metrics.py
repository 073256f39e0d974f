"""Metrics of a patched run, read from its last-position logits: one registry entry each.

A metric says which tokens it compares (`needs`), how one row of logits scores (`row`), and
whether sweeps report it normalised (corrupt 0, clean 1). Sweeps, `score`, the magics, the
workbench and the CLI all read this table, so a new metric is one entry here.

    >>> import torch
    >>> from nnpatch.patching.metrics import score
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    >>> score(logits, "logit_diff", answer=[0, 2], wrong=[1, 1])
    1.75
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import NNPatchTypeError, NNPatchValueError

# row(logits [rows, vocab], answer [rows] | None, wrong [rows] | None, clean_logprobs [rows, vocab] | None) -> [rows]
RowScore = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    name: str
    needs: tuple[str, ...]  # the tokens it compares: "answer", "wrong"
    row: RowScore
    normalized: bool  # sweeps report (value - corrupt) / (clean - corrupt)
    description: str
    needs_clean: bool = False  # compares with the clean run's distribution

    @property
    def two_logits(self) -> bool:
        """Whether a row's score depends on the answer and wrong logits alone (so a sweep can
        compute just those two columns of the unembedding)."""
        return self.needs == ("answer", "wrong") and self.row is _logit_diff


def _logit_diff(logits, answer, wrong, clean_logprobs):
    return (logits.gather(-1, answer[:, None]) - logits.gather(-1, wrong[:, None]))[:, 0]


def _prob(logits, answer, wrong, clean_logprobs):
    return logits.float().log_softmax(-1).gather(-1, answer[:, None])[:, 0].exp()


def _kl(logits, answer, wrong, clean_logprobs):
    logprobs = logits.float().log_softmax(-1)
    clean_logprobs = clean_logprobs.to(logprobs.device)
    return (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)  # KL(clean || this run)


REGISTRY: dict[str, Metric] = {m.name: m for m in (
    Metric("logit_diff", ("answer", "wrong"), _logit_diff, True,
           "answer minus wrong logit, normalised: corrupt 0, clean 1"),
    Metric("logit_diff_raw", ("answer", "wrong"), _logit_diff, False, "answer minus wrong logit"),
    Metric("prob", ("answer",), _prob, False, "probability of the answer"),
    Metric("kl", (), _kl, False, "KL divergence from the clean next-token distribution", needs_clean=True),
)}
METRICS = tuple(REGISTRY)


def get(name: str) -> Metric:
    """The registered metric `name`, or an error that lists them."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(str(name), METRICS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise NNPatchValueError(f"metric {name!r} is unknown; {hint}choose one of {', '.join(METRICS)} "
                            "or pass a function of the last-position logits [n_prompts, vocab]")


def score(logits: torch.Tensor, metric="logit_diff", answer=None, wrong=None,
          clean_logits: torch.Tensor | None = None) -> float:
    """One run's metric from its last-position logits `[n_prompts, vocab]`, as sweeps define it.

    Built-in metrics are the mean over prompts of: "logit_diff" / "logit_diff_raw", the answer's
    logit minus the wrong token's; "prob", the answer's probability; "kl", KL(clean || this run),
    which needs `clean_logits`. `answer` and `wrong` are token ids, one or one per prompt. A
    callable metric is called with the logits.

        >>> import torch, nnpatch
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
        >>> nnpatch.sweep.score(logits, "logit_diff", answer=[0, 2], wrong=[1, 1])
        1.75
    """
    if callable(metric):
        return float(metric(logits))
    m = get(metric)
    logits = logits.float()  # [n_prompts, vocab]
    tokens = {"answer": answer, "wrong": wrong}
    for what in m.needs:
        if tokens[what] is None:
            raise NNPatchTypeError(f"metric {m.name!r} needs {what}=... (a token id, or one per prompt)")
        tokens[what] = torch.as_tensor(tokens[what], device=logits.device).reshape(-1).expand(len(logits))
    if m.needs_clean and clean_logits is None:
        raise NNPatchTypeError(f'metric "{m.name}" needs clean_logits=... (the clean run\'s last-position logits)')
    clean_logprobs = None if clean_logits is None else clean_logits.float().log_softmax(-1)
    return float(m.row(logits, tokens["answer"], tokens["wrong"], clean_logprobs).mean())


def effect(patched: float, clean: float, corrupt: float) -> float:
    """How much of the clean behaviour a patch restores: (patched - corrupt) / (clean - corrupt),
    0 when the patch changes nothing, 1 when it restores the clean run; NaN when clean and
    corrupt score the same."""
    span = clean - corrupt
    return (patched - corrupt) / span if span else math.nan


class SweepMetric:
    """A metric as one sweep applies it, to the pairs of a job.

    Built-in metrics are means over pairs of a per-pair statistic, so a cell's value is the mean
    of its rows' statistics whatever batch they ran in. `mode` says what the runner must produce
    per row: "diff" (answer minus wrong logit, without computing the other logits) or "logits".
    """

    def __init__(self, metric, job):
        self.fn, self.spec = None, None
        if callable(metric):
            self.fn, self.name, self.normalized = metric, getattr(metric, "__name__", "custom"), False
        else:
            self.spec = get(metric)
            self.name, self.normalized = self.spec.name, self.spec.normalized
            for what in self.spec.needs:
                if getattr(job, what) is None:
                    raise NNPatchTypeError(f"metric {self.name!r} needs {what}=... (a single token, or one "
                                           "per pair), or task pairs that carry answers")
        self.mode = "diff" if self.spec is not None and self.spec.two_logits else "logits"
        self.job = job
        self.clean_logprobs: torch.Tensor | None = None  # [n_pairs, vocab], for metrics that need it

    def note_clean(self, pairs: list[int], clean_logits: torch.Tensor) -> None:
        """Keep the clean run's log-probabilities of some pairs (a sweep streams pairs in parts)."""
        if self.clean_logprobs is None:
            self.clean_logprobs = torch.zeros(self.job.n_pairs, self.job.vocab)
        self.clean_logprobs[pairs] = clean_logits.float().cpu().log_softmax(-1)

    def row_stats(self, out: torch.Tensor, group, pairs: list[int]) -> torch.Tensor:
        """Per-row statistic `[rows]` of per-row logit differences `[rows]` or logits
        `[rows, vocab]` (a custom metric keeps the logits)."""
        if self.fn is not None:
            return out
        if out.dim() == 1:  # already the logit differences
            return out
        idx = torch.as_tensor(pairs, device=out.device)
        pick = lambda ids: None if ids is None else ids[idx]  # noqa: E731
        clean = None
        if self.spec.needs_clean:
            clean = self.clean_logprobs[torch.as_tensor(group.pairs)[idx.cpu()]]
        return self.spec.row(out, pick(group.answer), pick(group.wrong), clean)

    def aggregate(self, stats: torch.Tensor) -> torch.Tensor:
        """One cell's value from its rows' statistics, in pair order."""
        return self.fn(stats) if self.fn is not None else stats.mean()

    def aggregate_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric of full last-position logits `[n_pairs, vocab]` in pair order."""
        job = self.job
        if self.fn is not None:
            return self.fn(logits)
        stats = torch.empty(job.n_pairs)
        for g in job.groups:
            stats[g.pairs] = self.row_stats(logits[g.pairs].to(job.device), g, list(range(g.n))).float().cpu()
        return stats.mean()

    def aggregate_runs(self, runs: list) -> torch.Tensor:
        """The metric over all pairs of differentiable last-position logits, one (group, logits)
        per group."""
        if self.fn is not None:
            order = torch.cat([torch.as_tensor(g.pairs) for g, _ in runs]).argsort()
            return self.fn(torch.cat([lg for _, lg in runs])[order.to(self.job.device)])
        total = 0
        for g, lg in runs:
            total = total + self.row_stats(lg, g, list(range(g.n))).sum()
        return total / self.job.n_pairs
