"""The public entry points: activation and attribution patching sweeps, and patching chosen cells.

Activation patching runs the model once per cell (a layer, and optionally a head and a position)
with the activation at that cell taken from the other prompt of a clean / corrupt pair, and
measures how much of the clean behaviour comes back. Attribution patching estimates every cell at
once from two forwards and one backward: metric(base) + (source - base) . d metric / d activation.

    >>> import nnpatch
    >>> model = nnpatch.models.load("ioi")
    >>> pairs = nnpatch.tasks.ioi(8, template=0)     # one template: positions line up
    >>> result = nnpatch.activation_patching(model, pairs, site="resid_pre", progress=False)
    >>> fig = result.plot()

The work is split: `job` checks the inputs and enumerates cells, `runner` runs them batched,
`metrics` scores the runs and `result` holds the grid.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..engine import Model
from ..engine.hooks import exclusive
from ..errors import NNPatchValueError
from .checkpoint import Checkpoint, fingerprint
from .distributed import ranks_for
from .job import CellSink, Job, Row
from .memory import Budget
from .metrics import effect
from .result import PatchingResult
from .runner import Runner

def _one_at_a_time(sweep):
    """Sweeps of one model from several threads run one after another (they swap blocks)."""
    @functools.wraps(sweep)
    def run(model, *args, **kwargs):
        with exclusive(model.module if isinstance(model, Model) else model):
            return sweep(model, *args, **kwargs)
    return run


@_one_at_a_time
def activation_patching(model, clean, corrupt=None, *, answer=None, wrong=None,
                        metric: str | Callable = "logit_diff", site: str = "resid_pre",
                        by: Sequence[str] | str = ("layer", "pos"), direction: str = "denoise",
                        layers: Sequence[int] | None = None, batch_size: int | None = None,
                        memory_budget: int | None = None,
                        progress: bool | Callable[[int, int], None] = True,
                        checkpoint: str | Path | None = None,
                        distributed: bool | None = None) -> PatchingResult:
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
    are batched up to `batch_size` rows (default: as many as `memory_budget` bytes allow), and
    pairs stream through in parts that fit `memory_budget` (default: half the free memory of the
    model's input device, on the CPU at most 1 GiB unless a pair needs more; `patching.memory`).
    `progress` shows a text tqdm bar on stderr (True; in a notebook too, so that a saved
    notebook keeps plain text), nothing (False), or is called as `progress(done, total)` as
    patched runs finish, e.g. to drive a widget's progress bar.

    `checkpoint="run.safetensors"` writes finished rows to that file as the sweep goes; the
    same call after a crash resumes from it (`patching.checkpoint`; a named metric only).
    `distributed=True` shares the work among the ranks of torch.distributed (started by
    torchrun, or `nnpatch sweep --nproc N`), and every rank returns the full grid; the default,
    None, distributes when torchrun's environment or a process group is there
    (`patching.distributed`; docs/scale.md).

        >>> import nnpatch
        >>> model = nnpatch.models.load("ioi")
        >>> r = nnpatch.activation_patching(model, "When Mary and John went to the store, John gave a drink to",
        ...     "When Mary and John went to the store, Mary gave a drink to",
        ...     answer=" Mary", wrong=" John", site="resid_pre", by=("layer", "pos"), progress=False)
        >>> r.dims, r.labels["pos"][-1]
        (('layer', 'pos'), ' to')
    """
    ranks = ranks_for(distributed)
    job = Job(model, clean, corrupt, answer, wrong, metric, site, by, direction, layers) if ranks is None \
        else ranks.together(lambda: Job(model, clean, corrupt, answer, wrong, metric, site, by, direction, layers))
    cells = list(enumerate(job.cells()))
    sink = CellSink(job, len(cells))
    mine, my_cells = (None, None)
    if ranks is not None:
        if job.metric.fn is not None:
            raise NNPatchValueError(
                f"distributed sweeps need a named metric (e.g. 'logit_diff'): a custom metric function "
                f"({job.metric.name}) scores a cell from all its pairs' logits at once, which the ranks "
                "do not exchange. Use a named metric, or sweep in one process")
        ranks.check_same({**fingerprint(job), "ranks": str(ranks.world),
                          "checkpoint": "yes" if checkpoint else "no"})
        mine, my_cells = ranks.share(job.n_pairs, len(cells))
        if my_cells is not None:
            cells = [cells[c] for c in my_cells]
        if ranks.rank != 0:
            progress = False

    def work():
        saved = None
        if checkpoint is not None:
            saved = Checkpoint(checkpoint if ranks is None else _rank_path(checkpoint, ranks), job, sink)
            saved.load()
        _sweep(job, Budget(job, memory_budget), cells, mine, sink, saved, batch_size, progress, ranks)
    if ranks is None:
        work()
    else:
        ranks.together(work)
        ranks.gather(sink)
    clean_score, corrupt_score = sink.scores()
    values = job.normalize(sink.values(), clean_score, corrupt_score)
    return job.result(values, clean_score, corrupt_score, "activation")


def _sweep(job, budget, cells, mine, sink, saved, batch_size, progress, ranks) -> None:
    """Run the rows of `cells` for the pairs `mine` (None: every pair) into `sink`, skipping
    rows a checkpoint already holds and writing the checkpoint as rows finish."""
    mine = None if mine is None else set(mine)
    groups = job.groups if mine is None else [g.part([i for i, p in enumerate(g.pairs) if p in mine])
                                              for g in job.groups]
    # Pairs stream through in parts that fit the budget: each part's reference runs, then its
    # patched runs, then the next part.
    parts = [part for g in groups if g.n for part in g.split(budget.pairs(g.clean.shape[1]))]
    todo = cells
    bar = None

    def start_bar(total):
        quiet_rank = ranks is not None and progress is False
        shown = None if quiet_rank else _progress(total, f"patching {job.site_name}", progress)
        if ranks is None:
            return shown
        shared = ranks.progress(shown)
        shared.total = total
        return shared
    try:
        for i, group in enumerate(parts):
            cell_ids = torch.tensor([c for c, _ in todo])
            left = ~sink.have[cell_ids][:, group.pairs]  # [cells, n]: rows still to run
            if not bool(left.any()) and bool(sink.have_reference[group.pairs].all()):
                if bar is not None:  # a checkpoint holds every row of this part
                    bar.total -= len(todo) * group.n
                    bar.refresh()
                continue
            runner = Runner(job, group)
            runner.reference_runs()
            sink.add_reference(group, runner.clean_logits, runner.corrupt_logits)
            # Runs whose patches write the value already there would reproduce the base run: they
            # are scored from it, and the bar counts only the runs that are done.
            idle, live = runner.rows(todo)
            done = sink.have
            idle = [r for r in idle if not done[r.cell, group.pairs[r.pair]]]
            live = [r for r in live if not done[r.cell, group.pairs[r.pair]]]
            if idle:
                pairs = [r.pair for r in idle]
                sink.add(group, idle, job.metric.row_stats(runner.base_logits[pairs], group, pairs))
            if bar is None:
                later = len(todo) * sum(p.n for p in parts[i + 1:])  # at most; shrinks as parts start
                bar = start_bar(len(live) + later)
            else:
                bar.total -= len(todo) * group.n - len(live)
                bar.refresh()
            for chunk in runner.chunks(live, batch_size or budget.rows(runner.seq)):
                out = runner.run(chunk, job.metric.mode)
                sink.add(group, chunk, job.metric.row_stats(out, group, [r.pair for r in chunk]))
                bar.update(len(chunk))
                if saved is not None:
                    saved.save()
            del runner  # its references: the next part reuses the memory
            if saved is not None:
                saved.save(force=True)
    finally:
        if saved is not None:
            saved.save(force=True)  # what finished stays, whatever stopped the sweep
        if bar is None and ranks is not None:
            bar = start_bar(0)  # the other ranks wait for this one's bar to close
        if bar is not None:
            bar.close()


def _rank_path(path, ranks) -> Path:
    """Each rank of a distributed sweep keeps its own checkpoint file beside the given one."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{ranks.rank}-of-{ranks.world}{path.suffix}")


@_one_at_a_time
def attribution_patching(model, clean, corrupt=None, *, answer=None, wrong=None,
                         metric: str | Callable = "logit_diff", site: str = "resid_pre",
                         by: Sequence[str] | str = ("layer", "pos"), direction: str = "denoise",
                         layers: Sequence[int] | None = None, batch_size: int | None = None,
                         memory_budget: int | None = None,
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
    job = Job(model, clean, corrupt, answer, wrong, metric, site, by, direction, layers)
    runners = [Runner(job, group) for group in job.groups]
    bar = _progress(2 * len(runners) + 1, f"attribution {job.site_name}", progress)
    try:
        sources, bases = [], []
        for runner in runners:
            sources.append(runner.capture_sites(runner.group.source_ids, grad=False))
            bar.update(1)
        for runner in runners:
            bases.append(runner.capture_sites(runner.group.base_ids, grad=True))
            bar.update(1)
        for runner, source, base in zip(runners, sources, bases):
            runner.set_scores(source.logits, base.logits)
        clean_score, corrupt_score = job.scores(runners)
        base_score = job.metric.aggregate_runs([(e.group, b.logits) for e, b in zip(runners, bases)])
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


@_one_at_a_time
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
    job = Job(model, clean, corrupt, answer, wrong, metric, site, by, direction, None)
    patches = tuple(job.patch_of(cell) for cell in cells)
    runners = [Runner(job, group) for group in job.groups]
    for runner in runners:
        runner.reference_runs()
    clean_score, corrupt_score = job.scores(runners)
    patched = torch.empty(job.n_pairs, job.vocab)
    for runner in runners:
        rows = [Row(pair, patches, 0) for pair in range(runner.group.n)]
        patched[runner.group.pairs] = runner.run(rows, "logits").float().cpu()
    patched_score = float(job.metric.aggregate_logits(patched))
    return PatchedRun(clean_score, corrupt_score, patched_score, effect(patched_score, clean_score, corrupt_score),
                      job.run_logits("clean", runners), job.run_logits("corrupt", runners), patched,
                      [tuple(c) if isinstance(c, (tuple, list)) else (c,) for c in cells],
                      job.site_name, job.metric.name)


def _progress(total: int, desc: str, progress: bool | Callable[[int, int], None]):
    """A text tqdm bar on stderr, or for a callable `progress` an object that calls it with
    (done, total).

    Text, also in a notebook: a saved notebook keeps it as text, where a widget bar (tqdm.auto)
    would reopen as "Error displaying widget: model not found". The bar stays on its own line
    when it closes, showing the final count: output printed after a sweep starts on the next
    line, and a bar cut short by an error shows where it stopped."""
    if callable(progress):
        return _CallbackProgress(total, progress)
    from tqdm.std import tqdm
    return tqdm(total=total, desc=desc, unit="run", disable=not progress, leave=True, file=sys.stderr)


class _CallbackProgress:
    def __init__(self, total: int, report: Callable[[int, int], None]):
        self.done, self.total, self.report = 0, total, report
        report(0, total)

    def update(self, n: int) -> None:
        self.done += n
        self.report(self.done, self.total)

    def refresh(self) -> None:
        self.report(self.done, self.total)

    def close(self) -> None:
        pass
