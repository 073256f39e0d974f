"""Activation and attribution patching sweeps over the standard sites of a model.

Activation patching runs the model once per cell (a layer, and optionally a head and a position)
with the activation at that cell taken from the other prompt of a clean / corrupt pair, and
measures how much of the clean behaviour comes back. Attribution patching estimates every cell at
once from two forwards and one backward: metric(base) + (source - base) . d metric / d activation.

    >>> import nnpatch
    >>> model = nnpatch.models.load("ioi")
    >>> pairs = nnpatch.tasks.ioi(8, template=0)     # one template: positions line up
    >>> result = nnpatch.activation_patching(model, pairs, site="resid_pre", progress=False)
    >>> fig = result.plot()

How a sweep avoids the work a loop does:
  * many patched runs share one forward pass (rows of a batch, chunked to a memory budget);
  * a run patched at layer L starts at block L from the unpatched run's cached residual stream
    (earlier blocks are swapped for a pass-through while it runs);
  * in a causal decoder, a run patched at position p starts at position p, with the unpatched
    run's keys and values of the earlier positions as its `past_key_values`;
  * logits are computed only at the last position, and for a logit difference only for the two
    tokens it compares.
Every hook is removed and every swapped block restored in a `finally`, so an error or Ctrl-C
leaves the model as it was.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ._hooks import hooks, resolve
from .batching import token_rows
from .errors import NNPatchError
from .result import PatchingResult
from .sites import Site, Sites, sites as standard_sites

BY = (("layer",), ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos"))
METRICS = ("logit_diff", "logit_diff_raw", "prob", "kl")
# The tokens each built-in metric compares ("kl" compares whole distributions).
_NEEDS = {"logit_diff": ("answer", "wrong"), "logit_diff_raw": ("answer", "wrong"), "prob": ("answer",), "kl": ()}


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------

def activation_patching(model, clean, corrupt=None, *, answer=None, wrong=None,
                        metric: str | Callable = "logit_diff", site: str = "resid_pre",
                        by: Sequence[str] | str = ("layer", "pos"), direction: str = "denoise",
                        layers: Sequence[int] | None = None, batch_size: int | None = None,
                        memory_budget: int = 1 << 30,
                        progress: bool | Callable[[int, int], None] = True) -> PatchingResult:
    """Patch every cell of a site, one cell at a time, and measure the metric.

    `clean` is a prompt, a list of prompts, or task pairs (an object with list attributes
    `clean`, `corrupt`, `answer`, `wrong`, from which the other arguments default). `corrupt`
    matches `clean` prompt for prompt, token for token. `answer` / `wrong` are single tokens
    (strings or ids), one for all pairs or one per pair.

    `metric`: "logit_diff" (answer minus wrong logit, normalised: corrupt 0, clean 1),
    "logit_diff_raw", "prob" (probability of the answer), "kl" (KL divergence from the clean
    next-token distribution), or a function of the last-position logits `[n_pairs, vocab]` that
    returns a scalar. Several pairs are averaged (the metric of the pairs' mean).

    `site` is a standard site name (see `nnpatch.sites(model)`); `by` is one of ("layer",),
    ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos") - heads need site="head_out".
    `direction="denoise"` patches clean activations into the corrupt run; "noise" patches corrupt
    activations into the clean run. `layers` restricts the sweep to some layers. Patched runs
    are batched up to `batch_size` rows (default: as many as `memory_budget` bytes allow).
    `progress` shows a tqdm bar (True), nothing (False), or is called as `progress(done, total)`
    as patched runs finish, e.g. to drive a widget's progress bar.

        >>> import nnpatch
        >>> model = nnpatch.models.load("ioi")
        >>> r = nnpatch.activation_patching(model, "When Mary and John went to the store, John gave a drink to",
        ...     "When Mary and John went to the store, Mary gave a drink to",
        ...     answer=" Mary", wrong=" John", site="resid_pre", by=("layer", "pos"), progress=False)
        >>> r.dims, r.labels["pos"][-1]
        (('layer', 'pos'), ' to')
    """
    job = _Job(model, clean, corrupt, answer, wrong, metric, site, by, direction, layers)
    engines = [_Engine(job, group) for group in job.groups]
    for engine in engines:
        engine.reference_runs()
    clean_score, corrupt_score = job.scores(engines)
    cells = job.cells()
    sink = _CellSink(job, len(cells))
    rows_total = len(cells) * job.n_pairs
    bar = _progress(rows_total, f"patching {job.site_name}", progress)
    try:
        for engine in engines:
            rows = [_Row(pair, (patch,), cell) for cell, patch in enumerate(cells)
                    for pair in range(engine.group.n)]
            idle, live = [], []
            for r in rows:
                (idle if engine.unchanged(r) else live).append(r)
            if idle:  # these runs would reproduce the base run
                pairs = [r.pair for r in idle]
                sink.add(engine.group, idle, job.metric.row_stats(engine.base_logits[pairs], engine.group, pairs))
                bar.update(len(idle))
            rows = live
            for chunk in engine.chunks(rows, batch_size, memory_budget):
                out = engine.run(chunk, job.metric.mode)
                sink.add(engine.group, chunk, job.metric.row_stats(out, engine.group, [r.pair for r in chunk]))
                bar.update(len(chunk))
    finally:
        bar.close()
    values = job.normalize(sink.values(), clean_score, corrupt_score)
    return job.result(values, clean_score, corrupt_score, "activation")


def attribution_patching(model, clean, corrupt=None, *, answer=None, wrong=None,
                         metric: str | Callable = "logit_diff", site: str = "resid_pre",
                         by: Sequence[str] | str = ("layer", "pos"), direction: str = "denoise",
                         layers: Sequence[int] | None = None, batch_size: int | None = None,
                         memory_budget: int = 1 << 30,
                         progress: bool | Callable[[int, int], None] = True) -> PatchingResult:
    """Estimate `activation_patching` for every cell from two forwards and one backward.

    Same arguments and result type as `activation_patching` (`batch_size` and `memory_budget`
    are accepted for symmetry; the pairs of one token length run as one batch). Each cell's value is the linear
    estimate metric(base) + sum((source - base) * grad), where base is the run being patched
    (corrupt when denoising), source the run patches come from, and grad the gradient of the
    metric with respect to the site's activation in the base run.

        >>> import nnpatch
        >>> from nnpatch import heatmap
        >>> model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(8, template=0)
        >>> atp = nnpatch.attribution_patching(model, pairs, site="attn_out", progress=False)
        >>> act = nnpatch.activation_patching(model, pairs, site="attn_out", progress=False)
        >>> fig = heatmap.scatter(atp, act)
    """
    job = _Job(model, clean, corrupt, answer, wrong, metric, site, by, direction, layers)
    engines = [_Engine(job, group) for group in job.groups]
    bar = _progress(2 * len(engines) + 1, f"attribution {job.site_name}", progress)
    try:
        sources, bases = [], []
        for engine in engines:
            sources.append(engine.capture_sites(engine.group.source_ids, grad=False))
            bar.update(1)
        for engine in engines:
            bases.append(engine.capture_sites(engine.group.base_ids, grad=True))
            bar.update(1)
        for engine, source, base in zip(engines, sources, bases):
            engine.set_scores(source.logits, base.logits)
        clean_score, corrupt_score = job.scores(engines)
        base_score = job.metric.aggregate_runs([(e.group, b.logits) for e, b in zip(engines, bases)])
        deltas = [d for b in bases for d in b.deltas]
        grads = torch.autograd.grad(base_score, deltas, allow_unused=True)
        bar.update(1)
    finally:
        bar.close()

    total = None
    grads = iter(grads)
    for source, base in zip(sources, bases):
        for layer_i in range(len(job.layers)):
            grad = next(grads)
            if grad is None:  # the metric does not depend on this site (e.g. after the last position)
                continue
            part = job.reduce((source.values[layer_i] - base.values[layer_i]) * grad)
            if total is None:
                total = torch.zeros(len(job.layers), *part.shape)
            total[layer_i] += part.float().cpu()
    if total is None:
        total = torch.zeros(len(job.layers), *job.cell_shape()[1:])
    values = job.normalize(total + float(base_score.detach()), clean_score, corrupt_score)
    return job.result(values, clean_score, corrupt_score, "attribution")


@dataclass
class PatchedRun:
    """What `patch_cells` measured: scores of the clean, corrupt and patched runs, the score
    normalised so that corrupt is 0 and clean is 1, and each run's last-position logits
    `[n_pairs, vocab]`."""

    clean_score: float
    corrupt_score: float
    patched_score: float
    score: float
    clean_logits: torch.Tensor
    corrupt_logits: torch.Tensor
    patched_logits: torch.Tensor
    cells: list[tuple[int, ...]]
    site: str
    metric: str


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
    if metric not in METRICS:
        raise NNPatchError(f"metric {metric!r} is unknown; choose one of {', '.join(METRICS)} "
                           "or pass a function of the last-position logits [n_prompts, vocab]")
    logits = logits.float()  # [n_prompts, vocab]
    tokens = {"answer": answer, "wrong": wrong}
    for what in _NEEDS[metric]:
        if tokens[what] is None:
            raise NNPatchError(f"metric {metric!r} needs {what}=... (a token id, or one per prompt)")
        tokens[what] = torch.as_tensor(tokens[what], device=logits.device).reshape(-1).expand(len(logits))
    if metric == "kl" and clean_logits is None:
        raise NNPatchError('metric "kl" needs clean_logits=... (the clean run\'s last-position logits)')
    clean_logprobs = None if clean_logits is None else clean_logits.float().log_softmax(-1)
    return float(_row_scores(metric, logits, tokens["answer"], tokens["wrong"], clean_logprobs).mean())


def _row_scores(metric: str, logits, answer, wrong, clean_logprobs) -> torch.Tensor:
    """Per-row statistic of a built-in metric; `answer`, `wrong` are id tensors `[rows]`."""
    if metric in ("logit_diff", "logit_diff_raw"):
        return (logits.gather(-1, answer[:, None]) - logits.gather(-1, wrong[:, None]))[:, 0]
    logprobs = logits.float().log_softmax(-1)
    if metric == "prob":
        return logprobs.gather(-1, answer[:, None])[:, 0].exp()
    clean_logprobs = clean_logprobs.to(logprobs.device)
    return (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)  # KL(clean || patched)


def patch_cells(model, clean, corrupt=None, cells=(), *, site: str = "resid_pre",
                by: Sequence[str] | str = ("layer", "pos"), answer=None, wrong=None,
                metric: str | Callable = "logit_diff", direction: str = "denoise") -> PatchedRun:
    """Patch a set of cells together, in one run per prompt pair.

    `cells` are index tuples in the order of `by`: `[(3, 5), (4, 5)]` for ("layer", "pos"),
    `[(9, 6)]` for ("layer", "head"), `[(2,)]` or `[2]` for ("layer",). Positions may be negative.

        >>> import nnpatch
        >>> from nnpatch.sweep import patch_cells
        >>> model = nnpatch.models.load("ioi")
        >>> run = patch_cells(model, nnpatch.tasks.ioi(4, template=0), cells=[(2, -1), (3, -1)], site="attn_out")
        >>> run.patched_logits.shape[0], run.clean_score > run.corrupt_score   # score: 0 corrupt, 1 clean
        (4, True)
    """
    job = _Job(model, clean, corrupt, answer, wrong, metric, site, by, direction, None)
    patches = tuple(job.patch_of(cell) for cell in cells)
    engines = [_Engine(job, group) for group in job.groups]
    for engine in engines:
        engine.reference_runs()
    clean_score, corrupt_score = job.scores(engines)
    patched = torch.empty(job.n_pairs, job.vocab)
    for engine in engines:
        rows = [_Row(pair, patches, 0) for pair in range(engine.group.n)]
        patched[engine.group.pairs] = engine.run(rows, "logits").float().cpu()
    patched_score = float(job.metric.aggregate_logits(patched))
    span = clean_score - corrupt_score
    score = (patched_score - corrupt_score) / span if span else float("nan")
    return PatchedRun(clean_score, corrupt_score, patched_score, score,
                      job.run_logits("clean", engines), job.run_logits("corrupt", engines), patched,
                      [tuple(c) if isinstance(c, (tuple, list)) else (c,) for c in cells],
                      job.site_name, job.metric.name)


# ------------------------------------------------------------------------------------------------
# The job: inputs checked and tokenized, prompt pairs grouped by length, cells enumerated
# ------------------------------------------------------------------------------------------------

@dataclass
class _Group:
    """Prompt pairs of one token length: the unit of batched execution."""

    pairs: list[int]  # indices into the job's pairs
    clean: torch.Tensor  # [n, pos]
    corrupt: torch.Tensor  # [n, pos]
    answer: torch.Tensor | None  # [n]
    wrong: torch.Tensor | None  # [n]
    direction: str

    @property
    def n(self) -> int:
        return len(self.pairs)

    @property
    def base_ids(self) -> torch.Tensor:  # the run that gets patched
        return self.corrupt if self.direction == "denoise" else self.clean

    @property
    def source_ids(self) -> torch.Tensor:  # the run patches come from
        return self.clean if self.direction == "denoise" else self.corrupt


@dataclass(frozen=True)
class _Patch:
    layer: int
    pos: int | None  # None: every position
    head: int | None  # None: every head (the whole site)


@dataclass(frozen=True)
class _Row:
    """One patched run: a prompt pair of a group, the patches applied to it, and its cell."""

    pair: int
    patches: tuple[_Patch, ...]
    cell: int

    @property
    def layer(self) -> int:
        return min(p.layer for p in self.patches) if self.patches else 0

    @property
    def pos(self) -> int:
        return min((p.pos or 0) for p in self.patches) if self.patches else 0


class _Job:
    def __init__(self, model, clean, corrupt, answer, wrong, metric, site, by, direction, layers):
        self.module = getattr(model, "_module", model)
        if not isinstance(self.module, torch.nn.Module):
            raise NNPatchError(f"patching needs an nnpatch model or a torch module, got {type(model).__name__}")
        if self.module.training:
            warnings.warn("the model is in training mode, so dropout makes every run different; "
                          "call .eval() on it before patching", stacklevel=3)
        self.tokenizer = getattr(model, "tokenizer", None)
        self.model_name = (getattr(getattr(self.module, "config", None), "_name_or_path", "")
                           or type(self.module).__name__)
        self.device = next(self.module.parameters()).device
        if direction not in ("denoise", "noise"):
            raise NNPatchError(f"direction must be 'denoise' (clean into corrupt) or 'noise' "
                               f"(corrupt into clean), got {direction!r}")
        self.direction = direction

        self.table: Sites = standard_sites(self.module)
        self.site_name = site
        self.sites: tuple[Site, ...] = self.table[site]
        self.by = _check_by(by, site, self.sites[0])
        self.layers = _check_layers(layers, self.table.n_layers)

        clean_p, corrupt_p, answer, wrong = _unpack_pairs(clean, corrupt, answer, wrong)
        self.clean_ids = [self._tokens(p, "clean", i) for i, p in enumerate(clean_p)]
        self.corrupt_ids = [self._tokens(p, "corrupt", i) for i, p in enumerate(corrupt_p)]
        self.n_pairs = len(self.clean_ids)
        for i, (c, k) in enumerate(zip(self.clean_ids, self.corrupt_ids)):
            if len(c) != len(k):
                raise NNPatchError(
                    f"clean prompt {i} is {len(c)} tokens long but corrupt prompt {i} is {len(k)} tokens "
                    f"long; patching needs the two to line up token for token (clean: "
                    f"{self._str_tokens(c)}, corrupt: {self._str_tokens(k)}). Reword the corrupt "
                    "prompt so that it tokenizes to the same length")
        lengths = sorted({len(c) for c in self.clean_ids})
        if "pos" in self.by and len(lengths) > 1:
            raise NNPatchError(
                f"by={self.by} needs every prompt pair to have the same number of tokens, but the pairs "
                f"have {lengths} tokens; sweep each length separately, or use by=('layer',) / "
                "('layer', 'head'), which averages pairs of any lengths")
        self.answer = self._answer_ids(answer, "answer")
        self.wrong = self._answer_ids(wrong, "wrong")
        self.vocab = _vocab_size(self.module)
        self.metric = _Metric(metric, self)
        self.groups = []
        for length in lengths:
            idx = [i for i, c in enumerate(self.clean_ids) if len(c) == length]
            self.groups.append(_Group(
                idx, self._ids([self.clean_ids[i] for i in idx]), self._ids([self.corrupt_ids[i] for i in idx]),
                None if self.answer is None else self.answer[idx].to(self.device),
                None if self.wrong is None else self.wrong[idx].to(self.device), direction))
        self.seq_len = lengths[0]

    # -- inputs ---------------------------------------------------------------------------------
    def _tokens(self, prompt, which: str, i: int) -> list[int]:
        try:
            rows = token_rows(self.tokenizer, prompt)
        except NNPatchError as e:
            raise NNPatchError(f"{which} prompt {i}: {e}") from None
        if len(rows) != 1:
            raise NNPatchError(f"{which} prompt {i} holds {len(rows)} prompts; give one prompt per pair")
        return rows[0]

    def _ids(self, seqs: list[list[int]]) -> torch.Tensor:
        return torch.tensor(seqs, dtype=torch.long, device=self.device)

    def _str_tokens(self, ids: list[int]) -> list[str]:
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

    def _answer_ids(self, value, what: str) -> torch.Tensor | None:
        if value is None:
            return None
        many = isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() > 0)
        values = list(value) if many else [value] * self.n_pairs
        if len(values) != self.n_pairs:
            raise NNPatchError(f"{len(values)} {what} tokens for {self.n_pairs} prompt pairs; give one "
                               f"{what} for all pairs or one per pair")
        return torch.tensor([self._single_token(v, what, i) for i, v in enumerate(values)], dtype=torch.long)

    def _single_token(self, v, what: str, i: int) -> int:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = int(v)
        if isinstance(v, int):
            if self.vocab_guess() and not 0 <= v < self.vocab_guess():
                raise NNPatchError(f"{what} token id {v} (pair {i}) is outside the vocabulary of "
                                   f"{self.vocab_guess()} tokens")
            return v
        if not isinstance(v, str):
            raise NNPatchError(f"{what} (pair {i}) must be a token string or id, got {type(v).__name__}")
        if self.tokenizer is None:
            raise NNPatchError(f"{what} {v!r} is a string but the model has no tokenizer; give its token id")
        ids = self.tokenizer(v, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise NNPatchError(
                f"{what} {v!r} (pair {i}) is {len(ids)} tokens under this tokenizer "
                f"({self._str_tokens(ids)}); the metric compares single next-token logits, so give "
                "one token (often with a leading space, e.g. ' Mary') or its id")
        return ids[0]

    def vocab_guess(self) -> int | None:
        return getattr(getattr(self.module, "config", None), "vocab_size", None)

    # -- cells ----------------------------------------------------------------------------------
    def cell_shape(self) -> tuple[int, ...]:
        sizes = {"layer": len(self.layers), "head": self.sites[0].heads, "pos": self.seq_len}
        return tuple(sizes[d] for d in self.by)

    def cells(self) -> list[_Patch]:
        heads = range(self.sites[0].heads or 1) if "head" in self.by else [None]
        positions = range(self.seq_len) if "pos" in self.by else [None]
        return [_Patch(layer, pos, head) for layer in self.layers for head in heads for pos in positions]

    def patch_of(self, cell) -> _Patch:
        cell = tuple(cell) if isinstance(cell, (tuple, list)) else (cell,)
        if len(cell) != len(self.by):
            raise NNPatchError(f"cell {cell} does not match by={self.by}; give one index per dim, "
                               f"e.g. {tuple(0 for _ in self.by)}")
        named = dict(zip(self.by, (int(c) for c in cell)))
        sizes = {"layer": self.table.n_layers, "head": self.sites[0].heads, "pos": self.seq_len}
        for dim, i in named.items():
            if not -sizes[dim] <= i < sizes[dim]:
                raise NNPatchError(f"cell {cell}: {dim} {i} is out of range; the model has "
                                   f"{sizes[dim]} {dim}s (0..{sizes[dim] - 1})")
            named[dim] = i % sizes[dim]
        return _Patch(named["layer"], named.get("pos"), named.get("head"))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a per-pair, per-position, per-feature attribution `[n, pos, d]` down to one cell grid."""
        if "head" in self.by:
            x = x.reshape(*x.shape[:-1], self.sites[0].heads, -1).sum(-1)  # [n, pos, head]
            x = x.sum(0)  # [pos, head]
            return x.transpose(0, 1) if "pos" in self.by else x.sum(0)
        x = x.sum(-1).sum(0)  # [pos]
        return x if "pos" in self.by else x.sum()

    # -- scores and the result --------------------------------------------------------------------
    def scores(self, engines) -> tuple[float, float]:
        clean_logits = self.run_logits("clean", engines)
        if self.metric.name == "kl":
            self.metric.clean_logprobs = clean_logits.float().log_softmax(-1)
        clean = float(self.metric.aggregate_logits(clean_logits))
        corrupt = float(self.metric.aggregate_logits(self.run_logits("corrupt", engines)))
        if self.metric.normalized and abs(clean - corrupt) < 1e-9:
            raise NNPatchError(
                f"the clean and corrupt runs have the same logit difference ({clean:.6g}), so the "
                "normalised logit difference is undefined; check answer/wrong, or use "
                "metric='logit_diff_raw'")
        return clean, corrupt

    def run_logits(self, which: str, engines) -> torch.Tensor:
        out = torch.empty(self.n_pairs, self.vocab)
        for e in engines:
            out[e.group.pairs] = (e.clean_logits if which == "clean" else e.corrupt_logits).float().cpu()
        return out

    def normalize(self, values: torch.Tensor, clean: float, corrupt: float) -> torch.Tensor:
        if self.metric.normalized:
            return (values - corrupt) / (clean - corrupt)
        return values

    def result(self, values, clean_score, corrupt_score, method) -> PatchingResult:
        labels = {"layer": [str(self.sites[layer]) for layer in self.layers]}
        if "head" in self.by:
            labels["head"] = [str(h) for h in range(self.sites[0].heads)]
        if "pos" in self.by:
            clean, corrupt = self._str_tokens(self.clean_ids[0]), self._str_tokens(self.corrupt_ids[0])
            labels["pos"] = [c if c == k else f"{c}/{k}" for c, k in zip(clean, corrupt)]
        return PatchingResult(values=values.reshape(self.cell_shape()), dims=self.by, labels=labels,
                              clean_score=clean_score, corrupt_score=corrupt_score,
                              metric=self.metric.name, site=self.site_name, method=method,
                              direction=self.direction, n_pairs=self.n_pairs, layers=list(self.layers),
                              model=self.model_name)


def _from_task_pairs(clean, corrupt, answer, wrong):
    """`clean` as given, or, when it is task pairs (with lists `clean`, `corrupt` and optionally
    `answer`, `wrong`), its prompts, with the other arguments defaulting to its lists."""
    if not (hasattr(clean, "clean") and hasattr(clean, "corrupt")):
        return clean, corrupt, answer, wrong
    task = clean
    return (task.clean, task.corrupt if corrupt is None else corrupt,
            getattr(task, "answer", None) if answer is None else answer,
            getattr(task, "wrong", None) if wrong is None else wrong)


def _unpack_pairs(clean, corrupt, answer, wrong):
    clean, corrupt, answer, wrong = _from_task_pairs(clean, corrupt, answer, wrong)
    if corrupt is None:
        raise NNPatchError("patching needs corrupt prompts: pass corrupt=..., or task pairs (an object "
                           "with clean, corrupt, answer and wrong lists, e.g. nnpatch.tasks.ioi(8))")
    clean, corrupt = _as_list(clean), _as_list(corrupt)
    if len(clean) != len(corrupt):
        raise NNPatchError(f"{len(clean)} clean prompts but {len(corrupt)} corrupt prompts; give one "
                           "corrupt prompt per clean prompt")
    if not clean:
        raise NNPatchError("no prompts given")
    return clean, corrupt, answer, wrong


def _as_list(prompts) -> list:
    """A list with one entry per prompt, whatever form the prompts came in."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        return [row.tolist() for row in (prompts if prompts.dim() == 2 else prompts.reshape(1, -1))]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    return list(prompts)


def _check_by(by, site: str, first: Site) -> tuple[str, ...]:
    if isinstance(by, str):
        by = tuple(part.strip() for part in by.split(",") if part.strip())
    by = tuple(by)
    if by not in BY:
        raise NNPatchError(f"by={by} is not a sweep shape; choose one of {', '.join(map(str, BY))}")
    if "head" in by and not first.heads:
        raise NNPatchError(
            f"by={by} splits the site into attention heads, but site {site!r} ({first}) has no heads; "
            "use site='head_out' (each head's output before the attention output projection)")
    return by


def _check_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    out = []
    for layer in layers:
        if not -n_layers <= int(layer) < n_layers:
            raise NNPatchError(f"layer {layer} is out of range; the model has {n_layers} layers")
        out.append(int(layer) % n_layers)
    return out


def _vocab_size(module: torch.nn.Module) -> int:
    config = getattr(module, "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None:
        raise NNPatchError(f"{type(module).__name__} has no config.vocab_size; sweeps read next-token logits")
    return int(size)


# ------------------------------------------------------------------------------------------------
# Metrics: per-row statistics of the last-position output, averaged over pairs per cell
# ------------------------------------------------------------------------------------------------

class _Metric:
    """A metric read from each patched run's last-position logits.

    Built-in metrics are means over pairs of a per-pair statistic, so a cell's value is the mean
    of its rows' statistics whatever batch they ran in. `mode` says what the engine must produce
    per row: "diff" (answer minus wrong logit, without computing the other logits) or "logits".
    """

    def __init__(self, metric, job: _Job):
        self.fn = None
        if callable(metric):
            self.fn, self.name, self.normalized = metric, getattr(metric, "__name__", "custom"), False
        elif metric in METRICS:
            self.name, self.normalized = metric, metric == "logit_diff"
        else:
            raise NNPatchError(f"metric {metric!r} is unknown; choose one of {', '.join(METRICS)} "
                               "or pass a function of the last-position logits [n_pairs, vocab]")
        for what in _NEEDS.get(self.name if self.fn is None else "", ()):
            if getattr(job, what) is None:
                raise NNPatchError(f"metric {self.name!r} needs {what}=... (a single token, or one per pair), "
                                   "or task pairs that carry answers")
        self.mode = "diff" if self.name in ("logit_diff", "logit_diff_raw") and self.fn is None else "logits"
        self.job = job
        self.clean_logprobs: torch.Tensor | None = None  # [n_pairs, vocab], set for "kl"

    def row_stats(self, out: torch.Tensor, group: _Group, pairs: list[int]) -> torch.Tensor:
        """Per-row statistic `[rows]` of per-row logit differences `[rows]` or logits
        `[rows, vocab]` (a custom metric keeps the logits)."""
        if self.fn is not None:
            return out
        if out.dim() == 1:  # already the logit differences
            return out
        idx = torch.as_tensor(pairs, device=out.device)
        pick = lambda ids: None if ids is None else ids[idx]  # noqa: E731
        clean = None
        if self.name == "kl":
            clean = self.clean_logprobs[torch.as_tensor(group.pairs)[idx.cpu()]]
        return _row_scores(self.name, out, pick(group.answer), pick(group.wrong), clean)

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

    def aggregate_runs(self, runs: list[tuple[_Group, torch.Tensor]]) -> torch.Tensor:
        """The metric over all pairs of differentiable last-position logits, one tensor per group."""
        if self.fn is not None:
            order = torch.cat([torch.as_tensor(g.pairs) for g, _ in runs]).argsort()
            return self.fn(torch.cat([lg for _, lg in runs])[order.to(self.job.device)])
        total = 0
        for g, lg in runs:
            total = total + self.row_stats(lg, g, list(range(g.n))).sum()
        return total / self.job.n_pairs


class _CellSink:
    """Collects per-row statistics into per-cell values as chunks finish."""

    def __init__(self, job: _Job, n_cells: int):
        self.job, self.n_cells = job, n_cells
        if job.metric.fn is None:
            self.stats = torch.zeros(n_cells, job.n_pairs)
        else:  # a custom metric needs all of a cell's logits at once
            self.pending: dict[int, dict[int, torch.Tensor]] = {}
            self.done = torch.zeros(n_cells)

    def add(self, group: _Group, rows: list[_Row], stats: torch.Tensor) -> None:
        cells = torch.tensor([r.cell for r in rows])
        pairs = torch.tensor([group.pairs[r.pair] for r in rows])
        if self.job.metric.fn is None:
            self.stats[cells, pairs] = stats.float().cpu()
            return
        for row, cell, pair in zip(stats, cells.tolist(), pairs.tolist()):
            got = self.pending.setdefault(cell, {})
            got[pair] = row.float().cpu()
            if len(got) == self.job.n_pairs:
                logits = torch.stack([got[p] for p in range(self.job.n_pairs)])
                self.done[cell] = float(self.job.metric.aggregate(logits))
                del self.pending[cell]

    def values(self) -> torch.Tensor:
        if self.job.metric.fn is None:
            return self.stats.mean(-1)
        return self.done


# ------------------------------------------------------------------------------------------------
# The engine: reference runs, chunked patched runs, gradient runs for one group of pairs
# ------------------------------------------------------------------------------------------------

class _Engine:
    def __init__(self, job: _Job, group: _Group):
        self.job, self.group = job, group
        self.seq = group.clean.shape[1]  # this group's token length
        table = job.table
        self.fast = table.base is not None  # can run the blocks and the unembedding separately
        self.base = resolve(job.module, table.base) if self.fast else None
        self.unembed = resolve(job.module, table.unembed) if self.fast else None
        config = getattr(job.module, "config", None)
        window = getattr(config, "sliding_window", None)
        # A sliding-window cache keeps only the last `window` keys, so it cannot be sliced by position.
        self.kv = table.kv_cache and not (window and self.seq >= window)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.block_out_len = 0  # 0: blocks return a tensor; k: a tuple of k elements

    # -- reference runs ---------------------------------------------------------------------------
    def reference_runs(self) -> None:
        """Run the source and the base prompts once, keeping what the patched runs reuse."""
        group, job = self.group, self.job
        layers = sorted(set(job.layers))
        values: dict[int, torch.Tensor] = {}
        specs = [(job.sites[layer].path, job.sites[layer].kind, _keeper(job.sites[layer], values, layer))
                 for layer in layers]
        with torch.no_grad(), hooks(job.module, specs):
            source_logits, _ = self._forward(group.source_ids, want_cache=False)
        self.source_values = values  # layer -> [n, pos, d]

        resid: dict[int, torch.Tensor] = {}
        base_values: dict[int, torch.Tensor] = {}
        block_site = [Site(f"{job.table.blocks}.{i}", "input", 0, None, i) for i in range(job.table.n_layers)]
        specs = [(s.path, "input", _keeper(s, resid, i)) for i, s in enumerate(block_site)]
        specs += [(job.sites[layer].path, job.sites[layer].kind, _keeper(job.sites[layer], base_values, layer))
                  for layer in layers]
        specs.append((f"{job.table.blocks}.0", "output", self._note_block_output))
        with torch.no_grad(), hooks(job.module, specs):
            base_logits, self.cache = self._forward(group.base_ids, want_cache=self.kv)
        self.base_resid = resid  # layer -> [n, pos, d], the input of each block in the base run
        self.base_logits = base_logits  # [n, vocab]
        # Where source and base agree exactly (in a causal model: every position before the first
        # token that differs), a patch changes nothing and its run can be skipped.
        self.same = {}
        for layer in layers:
            src, base = values[layer], base_values[layer]
            heads = job.sites[layer].heads
            if heads:
                src, base = src.reshape(*src.shape[:-1], heads, -1), base.reshape(*base.shape[:-1], heads, -1)
            self.same[layer] = (src == base).all(-1).cpu()  # [n, pos] or [n, pos, head]
        self.set_scores(source_logits, base_logits)

    def unchanged(self, row: "_Row") -> bool:
        """Whether every patch of the row writes the value that is already there."""
        for p in row.patches:
            same = self.same[p.layer][row.pair]
            if p.pos is not None:
                same = same[p.pos]
            if p.head is not None:
                same = same[..., p.head]
            if not bool(same.all()):
                return False
        return True

    def set_scores(self, source_logits, base_logits) -> None:
        denoise = self.job.direction == "denoise"
        self.clean_logits = (source_logits if denoise else base_logits).detach()
        self.corrupt_logits = (base_logits if denoise else source_logits).detach()

    def _note_block_output(self, module, args, kwargs, output):
        self.block_out_len = len(output) if isinstance(output, tuple) else 0

    def _forward(self, ids, *, want_cache: bool):
        """Unpatched full run: last-position logits `[n, vocab]` and the key/value cache."""
        if not self.fast:
            return _last_logits(self.job.module, ids), None
        out = self.base(input_ids=ids, use_cache=True) if want_cache else self.base(input_ids=ids)
        hidden = _hidden(out)[:, -1]
        return self._unembed(hidden), (out.past_key_values if want_cache else None)

    def _unembed(self, hidden: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the final hidden state `[rows, d]`: all `[rows, vocab]`, or only `columns`
        `[rows, k]` when the unembedding is a plain linear map."""
        if columns is not None and isinstance(self.unembed, torch.nn.Linear):
            w = self.unembed.weight[columns]  # [rows, k, d]
            logits = torch.einsum("rd,rkd->rk", hidden, w)
            if self.unembed.bias is not None:
                logits = logits + self.unembed.bias[columns]
        else:
            logits = self.unembed(hidden)
            if columns is not None:
                logits = logits.gather(-1, columns)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # -- chunking ---------------------------------------------------------------------------------
    def chunks(self, rows: list[_Row], batch_size: int | None, memory_budget: int):
        """Rows in batches that share as much of the skipped work as the cost model finds worth it."""
        cap = batch_size or self._rows_for(memory_budget)
        n_layers, seq = self.job.table.n_layers, self.seq
        key = (lambda r: (r.layer if self.fast else 0, r.pos if self.kv else 0))
        rows = sorted(rows, key=key)
        groups: list[list[_Row]] = []
        for r in rows:
            if groups and key(groups[-1][0]) == key(r):
                groups[-1].append(r)
            else:
                groups.append([r])
        overhead = self._overhead_tokens()

        def cost(n_rows, start):
            layer, pos = start
            return (n_rows * (seq - pos) + 16 + overhead) * (n_layers - layer)

        chunk: list[_Row] = []
        start = None
        for g in groups:
            while len(g) > cap:  # a group larger than the budget runs in pieces
                if chunk:
                    yield chunk
                    chunk = []
                yield g[:cap]
                g = g[cap:]
            gkey = key(g[0])
            if chunk:
                merged = (min(start[0], gkey[0]), min(start[1], gkey[1]))
                if (len(chunk) + len(g) <= cap
                        and cost(len(chunk) + len(g), merged) <= cost(len(chunk), start) + cost(len(g), gkey)):
                    chunk += g
                    start = merged
                    continue
                yield chunk
            chunk, start = list(g), gkey
        if chunk:
            yield chunk

    def _rows_for(self, budget: int) -> int:
        config = getattr(self.job.module, "config", None)
        d = getattr(config, "hidden_size", 1024)
        d_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
        seq, n_layers = self.seq, self.job.table.n_layers
        per_row = 4 * (seq * (d_ff + 6 * d) + 2 * n_layers * seq * d)
        if self.job.metric.mode == "logits":
            per_row += 4 * self.job.vocab
        return max(1, budget // per_row)

    def _overhead_tokens(self) -> float:
        """Per-layer Python overhead of a forward call, in units of one token's compute."""
        d = getattr(getattr(self.job.module, "config", None), "hidden_size", 512)
        return 3e7 / (24 * d * d)

    # -- a batch of patched runs --------------------------------------------------------------------
    def run(self, rows: list[_Row], mode: str) -> torch.Tensor:
        """Patched runs of `rows` in one forward: per-row logit differences `[rows]` (mode "diff")
        or last-position logits `[rows, vocab]`."""
        job, group = self.job, self.group
        start_layer = min(r.layer for r in rows) if self.fast else 0
        start_pos = min(r.pos for r in rows) if self.kv else 0
        pairs = torch.tensor([r.pair for r in rows], device=job.device)
        ids = group.base_ids[pairs, start_pos:]  # [rows, pos - start_pos]
        specs = []
        if start_layer > 0:
            resid = self.base_resid[start_layer][pairs, start_pos:]  # [rows, pos', d]
            block = Site(f"{job.table.blocks}.{start_layer}", "input")
            specs.append((block.path, "input", _replace(block, lambda _: resid)))
        for layer, patch in self._patches(rows, pairs, start_pos).items():
            site = job.sites[layer]
            if site.via is None:
                specs.append((site.path, site.kind, _patch_hook(site, patch)))
            else:  # written through an addend: the addend becomes wanted value minus the stream
                stream: dict[str, torch.Tensor] = {}
                specs.append((site.stream.path, site.stream.kind, _keeper(site.stream, stream, "x", detach=False)))
                specs.append((site.via.path, site.via.kind, _patch_hook(site.via, patch, stream)))
        last = job.table.n_layers - 1
        if self.kv and all(p.layer < last for r in rows for p in r.patches):
            # In the last block only the last position reaches the logits: its attention output
            # projection and MLP run on that position alone, and the residual adds broadcast.
            for name in ("head_out", "mlp_out"):
                if name in job.table:
                    trimmed = Site(job.table[name][last].path, "input")
                    specs.append((trimmed.path, "input", _replace(trimmed, lambda x: x[:, -1:])))
        cache = self._prefix_cache(pairs, start_pos) if start_pos > 0 else None
        with torch.no_grad(), hooks(job.module, specs), _skipping(self.job.module, job.table.blocks,
                                                                  start_layer, self.block_out_len):
            if not self.fast:
                return _last_logits(job.module, ids)
            out = self.base(input_ids=ids, past_key_values=cache, use_cache=True) if cache is not None \
                else self.base(input_ids=ids)
            hidden = _hidden(out)[:, -1]  # [rows, d]
            if mode == "diff":
                cols = torch.stack([group.answer[pairs], group.wrong[pairs]], -1)  # [rows, 2]
                two = self._unembed(hidden, cols)
                return two[:, 0] - two[:, 1]
            return self._unembed(hidden)

    def _patches(self, rows, pairs, start_pos):
        """Per layer: which (row, position, head) of the batch takes which source value."""
        seq = self.seq
        by_layer: dict[int, list[tuple[int, int, int, int]]] = {}
        for i, r in enumerate(rows):
            for p in r.patches:
                positions = range(start_pos, seq) if p.pos is None else [p.pos]
                for pos in positions:
                    by_layer.setdefault(p.layer, []).append((i, pos - start_pos, pos, -1 if p.head is None else p.head))
        out = {}
        for layer, entries in by_layer.items():
            t = torch.tensor(entries, device=self.job.device)
            rows_i, local, pos, head = t.unbind(-1)
            src_pairs = pairs[rows_i]
            heads = self.job.sites[layer].heads
            source = self.source_values[layer]
            if bool((head >= 0).all()):
                value = source.reshape(*source.shape[:-1], heads, -1)[src_pairs, pos, head]  # [k, head_dim]
                out[layer] = (rows_i, local, head, value, heads)
            else:
                out[layer] = (rows_i, local, None, source[src_pairs, pos], heads)  # [k, d]
        return out

    def _prefix_cache(self, pairs: torch.Tensor, length: int):
        """The base run's keys and values of positions before `length`, for the given pairs."""
        from transformers import DynamicCache
        cache = DynamicCache(config=self.job.module.config)
        for i, layer in enumerate(self.cache.layers):
            cache.update(layer.keys[pairs, :, :length], layer.values[pairs, :, :length], i)
        return cache

    # -- gradient runs (attribution patching) --------------------------------------------------------
    def capture_sites(self, ids: torch.Tensor, *, grad: bool) -> "_Captured":
        """One full run keeping each swept layer's site value; with grad, the values carry a zero
        leaf whose gradient is the metric's gradient with respect to the site."""
        job = self.job
        values: list[torch.Tensor | None] = [None] * len(job.layers)
        deltas: list[torch.Tensor | None] = [None] * len(job.layers)
        specs = []
        for i, layer in enumerate(job.layers):
            site = job.sites[layer]
            if grad and site.via is not None:
                # Read the value where it is; differentiate where it is written, so that the
                # gradient flows into every branch that reads it.
                specs.append((site.path, site.kind, _grad_probe(site, values, None, i)))
                specs.append((site.via.path, site.via.kind, _grad_probe(site.via, [None] * len(values), deltas, i)))
            else:
                specs.append((site.path, site.kind, _grad_probe(site, values, deltas if grad else None, i)))
        with torch.enable_grad() if grad else torch.no_grad(), hooks(job.module, specs):
            logits, _ = self._forward(ids, want_cache=False)
        missing = [str(job.sites[layer]) for layer, v in zip(job.layers, values) if v is None]
        if missing:
            raise NNPatchError(f"the forward pass never reached {', '.join(missing)}; these sites "
                               "cannot be patched in this model")
        return _Captured(values, [d for d in deltas if d is not None], logits)


@dataclass
class _Captured:
    values: list[torch.Tensor]  # per swept layer: [n, pos, d]
    deltas: list[torch.Tensor]  # per swept layer: the zero leaf added to the site
    logits: torch.Tensor  # [n, vocab]


# ------------------------------------------------------------------------------------------------
# Hooks and the layer skip
# ------------------------------------------------------------------------------------------------

def _keeper(site: Site, store: dict, key, detach: bool = True):
    """A hook that stores the site's value."""
    def keep(value):
        store[key] = value.detach() if detach else value
    if site.kind == "input":
        def hook(module, args, kwargs):
            keep(site.read(args, kwargs))
    else:
        def hook(module, args, kwargs, output):
            keep(site.read(args, kwargs, output))
    return hook


def _grad_probe(site: Site, values: list, deltas: list | None, i: int):
    """A hook that stores the site's value and, when `deltas` is given, adds a zero leaf to it:
    the leaf's gradient is the metric's gradient with respect to the site, whatever the model's
    parameters' requires_grad, and the graph to earlier layers stays intact."""
    def swap(value):
        values[i] = value.detach()
        if deltas is None:
            return value
        deltas[i] = torch.zeros_like(value, requires_grad=True)
        return value + deltas[i]
    return _replace(site, swap)


def _replace(site: Site, fn):
    """A forward hook (pre-hook for an input site) that replaces the site's value `x` by `fn(x)`."""
    if site.kind == "input":
        def hook(module, args, kwargs):
            return site.with_input(args, kwargs, fn(site.read(args, kwargs)))
    else:
        def hook(module, args, kwargs, output):
            return site.with_output(output, fn(site.read(args, kwargs, output)))
    return hook


def _patch_hook(site: Site, patch, stream: dict | None = None):
    """A hook that writes the patch's values into the site; with `stream` (holding the current
    value the site is added to), it writes the values minus the stream."""
    rows, local, head, value, heads = patch

    def apply(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        new = value.to(x.dtype)
        if stream is not None:
            new = new - stream["x"][rows, local]
        if head is None:
            x[rows, local] = new
        else:
            x.view(*x.shape[:-1], heads, -1)[rows, local, head] = new
        return x
    return _replace(site, apply)


class _Skip(torch.nn.Module):
    """Stands in for a block whose output a run overwrites anyway: returns its input unchanged."""

    def __init__(self, block: torch.nn.Module, out_len: int):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: parameters stay where they were
        self._out_len = out_len

    def forward(self, hidden_states, *args, **kwargs):
        if self._out_len:
            return (hidden_states,) + (None,) * (self._out_len - 1)
        return hidden_states

    def __getattr__(self, name):  # attributes the model's loop reads, e.g. attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@contextlib.contextmanager
def _skipping(root: torch.nn.Module, blocks_path: str, n: int, out_len: int):
    """Swap blocks 0..n-1 for pass-throughs for the duration of a with-block."""
    if n == 0:
        yield
        return
    blocks = resolve(root, blocks_path)
    saved = [blocks[i] for i in range(n)]
    try:
        for i in range(n):
            blocks[i] = _Skip(saved[i], out_len)
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


def _hidden(out) -> torch.Tensor:
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0] if isinstance(out, (tuple, list)) else out


def _last_logits(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits of a full forward of any language model."""
    out = module(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise NNPatchError(f"{type(module).__name__} returned {type(out).__name__}, not logits "
                           "[batch, pos, vocab]; sweeps need a model with a language-model head")
    return logits[:, -1]


def _progress(total: int, desc: str, progress: bool | Callable[[int, int], None]):
    """A tqdm bar, or for a callable `progress` an object that calls it with (done, total)."""
    if callable(progress):
        return _CallbackProgress(total, progress)
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="run", disable=not progress, leave=False)


class _CallbackProgress:
    def __init__(self, total: int, report: Callable[[int, int], None]):
        self.done, self.total, self.report = 0, total, report
        report(0, total)

    def update(self, n: int) -> None:
        self.done += n
        self.report(self.done, self.total)

    def close(self) -> None:
        pass
