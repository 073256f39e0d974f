"""A sweep's job: inputs checked and tokenized, prompt pairs grouped by token length, cells
enumerated, and the result assembled.

`Job` is everything a sweep knows before it runs the model; `runner.Runner` runs it. A cell is a
layer (and a head and/or a position, by `by`); a `Row` is one patched run: one prompt pair with
the patches of one cell (or of several cells patched together).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..engine import Model
from ..engine.devices import check_placement, input_device
from ..engine.inputs import check_prompts, model_limits, Prompts, token_ids, token_rows
from ..errors import NNPatchError, NNPatchAttributeError, NNPatchIndexError, NNPatchTypeError, NNPatchValueError
from .metrics import SweepMetric
from .pairs import unpack
from .result import PatchingResult
from .sites import Site, Sites, sites as standard_sites

BY = (("layer",), ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos"))


@dataclass
class Group:
    """Prompt pairs of one token length: the unit of batched execution."""

    pairs: list[int]  # indices into the job's pairs
    clean: torch.Tensor  # [n, pos]
    corrupt: torch.Tensor  # [n, pos]
    answer: torch.Tensor | None  # [n]
    wrong: torch.Tensor | None  # [n]
    direction: str
    # Added to the input embeddings of the clean and of the corrupt run ([n, pos, d] each, or None):
    # a corrupt run made by noise on the clean prompt (`noise.noise_patching`) rather than by its own prompt.
    noise: tuple[torch.Tensor | None, torch.Tensor | None] | None = None

    @property
    def n(self) -> int:
        return len(self.pairs)

    def part(self, keep: list[int]) -> "Group":
        """The pairs of this group at positions `keep` (indices into this group)."""
        at = torch.as_tensor(keep, dtype=torch.long)
        pick = lambda t: None if t is None else t[at.to(t.device)]  # noqa: E731
        noise = None if self.noise is None else tuple(pick(t) for t in self.noise)
        return Group([self.pairs[i] for i in keep], pick(self.clean), pick(self.corrupt), pick(self.answer),
                     pick(self.wrong), self.direction, noise)

    def split(self, size: int) -> list["Group"]:
        """This group in parts of at most `size` pairs (a sweep streams them one at a time)."""
        return [self.part(list(range(i, min(i + size, self.n)))) for i in range(0, self.n, size)]

    @property
    def base_ids(self) -> torch.Tensor:  # the run that gets patched
        return self.corrupt if self.direction == "denoise" else self.clean

    @property
    def source_ids(self) -> torch.Tensor:  # the run patches come from
        return self.clean if self.direction == "denoise" else self.corrupt

    @property
    def base_noise(self) -> torch.Tensor | None:  # [n, pos, d] added to the base run's input embeddings
        return None if self.noise is None else self.noise[self.direction == "denoise"]

    @property
    def source_noise(self) -> torch.Tensor | None:
        return None if self.noise is None else self.noise[self.direction != "denoise"]


@dataclass(frozen=True)
class Patch:
    layer: int
    pos: int | None  # None: every position
    head: int | None  # None: every head (the whole site)


@dataclass(frozen=True)
class Row:
    """One patched run: a prompt pair of a group, the patches applied to it, and its cell."""

    pair: int
    patches: tuple[Patch, ...]
    cell: int

    @property
    def layer(self) -> int:
        return min(p.layer for p in self.patches) if self.patches else 0

    @property
    def pos(self) -> int:
        return min((p.pos or 0) for p in self.patches) if self.patches else 0


class Job:
    def __init__(self, model, clean, corrupt, answer, wrong, metric, site, by, direction, layers):
        self.module = model.module if isinstance(model, Model) else model
        if not isinstance(self.module, torch.nn.Module):
            raise NNPatchTypeError(f"patching needs an nnpatch model or a torch module, got {type(model).__name__}")
        if self.module.training:
            warnings.warn("the model is in training mode, so dropout makes every run different; "
                          "call .eval() on it before patching", stacklevel=3)
        self.tokenizer = getattr(model, "tokenizer", None)
        self.model_name = (getattr(getattr(self.module, "config", None), "_name_or_path", "")
                           or type(self.module).__name__)
        check_placement(self.module)
        self.device = input_device(self.module)
        if direction not in ("denoise", "noise"):
            raise NNPatchValueError(f"direction must be 'denoise' (clean into corrupt) or 'noise' "
                                    f"(corrupt into clean), got {direction!r}")
        self.direction = direction

        self.table: Sites = standard_sites(self.module)
        self.site_name = site
        self.sites: tuple[Site, ...] = self.table[site]
        self.by = _check_by(by, site, self.sites[0])
        self.layers = _check_layers(layers, self.table.n_layers)

        clean_p, corrupt_p, answer, wrong = unpack(clean, corrupt, answer, wrong)
        self.clean_ids = [self._tokens(p, "clean", i) for i, p in enumerate(clean_p)]
        self.corrupt_ids = [self._tokens(p, "corrupt", i) for i, p in enumerate(corrupt_p)]
        self.n_pairs = len(self.clean_ids)
        for i, (c, k) in enumerate(zip(self.clean_ids, self.corrupt_ids)):
            if len(c) != len(k):
                raise NNPatchValueError(
                    f"clean prompt {i} is {len(c)} tokens long but corrupt prompt {i} is {len(k)} tokens "
                    f"long; patching needs the two to line up token for token (clean: "
                    f"{self._str_tokens(c)}, corrupt: {self._str_tokens(k)}). Reword the corrupt "
                    "prompt so that it tokenizes to the same length")
        lengths = sorted({len(c) for c in self.clean_ids})
        if "pos" in self.by and len(lengths) > 1:
            raise NNPatchValueError(
                f"by={self.by} needs every prompt pair to have the same number of tokens, but the pairs "
                f"have {lengths} tokens; sweep each length separately, or use by=('layer',) / "
                "('layer', 'head'), which averages pairs of any lengths")
        self.vocab = _vocab_size(self.module)
        self.answer = self._answer_ids(answer, "answer")
        self.wrong = self._answer_ids(wrong, "wrong")
        self.metric = SweepMetric(metric, self)
        self.groups = []
        for length in lengths:
            idx = [i for i, c in enumerate(self.clean_ids) if len(c) == length]
            self.groups.append(Group(
                idx, self._ids([self.clean_ids[i] for i in idx]), self._ids([self.corrupt_ids[i] for i in idx]),
                None if self.answer is None else self.answer[idx].to(self.device),
                None if self.wrong is None else self.wrong[idx].to(self.device), direction))
        self.seq_len = lengths[0]

    # -- inputs ---------------------------------------------------------------------------------
    def _tokens(self, prompt, which: str, i: int) -> list[int]:
        try:
            rows = token_rows(self.tokenizer, prompt)
        except NNPatchError as e:
            raise type(e)(f"{which} prompt {i}: {e}") from None
        if len(rows) != 1:
            raise NNPatchValueError(f"{which} prompt {i} holds {len(rows)} prompts; give one prompt per pair")
        vocab, context = model_limits(self.module)
        check_prompts(Prompts(torch.tensor(rows, dtype=torch.long)), vocab_size=vocab, context=context,
                      where=f" ({which} prompt {i})")
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
        ids = token_ids(self.tokenizer, value, self.n_pairs, what=what, unit="pair", vocab_size=self.vocab)
        return torch.tensor(ids, dtype=torch.long)

    # -- cells ----------------------------------------------------------------------------------
    def cell_shape(self) -> tuple[int, ...]:
        sizes = {"layer": len(self.layers), "head": self.sites[0].heads, "pos": self.seq_len}
        return tuple(sizes[d] for d in self.by)

    def cells(self) -> list[Patch]:
        heads = range(self.sites[0].heads or 1) if "head" in self.by else [None]
        positions = range(self.seq_len) if "pos" in self.by else [None]
        return [Patch(layer, pos, head) for layer in self.layers for head in heads for pos in positions]

    def patch_of(self, cell) -> Patch:
        cell = tuple(cell) if isinstance(cell, (tuple, list)) else (cell,)
        if len(cell) != len(self.by):
            raise NNPatchValueError(f"cell {cell} does not match by={self.by}; give one index per dim, "
                                    f"e.g. {tuple(0 for _ in self.by)}")
        named = dict(zip(self.by, (int(c) for c in cell)))
        sizes = {"layer": self.table.n_layers, "head": self.sites[0].heads, "pos": self.seq_len}
        for dim, i in named.items():
            if not -sizes[dim] <= i < sizes[dim]:
                raise NNPatchIndexError(f"cell {cell}: {dim} {i} is out of range; the model has "
                                        f"{sizes[dim]} {dim}s (0..{sizes[dim] - 1})")
            named[dim] = i % sizes[dim]
        return Patch(named["layer"], named.get("pos"), named.get("head"))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a per-pair, per-position, per-feature attribution `[n, pos, d]` down to one cell grid."""
        if "head" in self.by:
            x = x.reshape(*x.shape[:-1], self.sites[0].heads, -1).sum(-1)  # [n, pos, head]
            x = x.sum(0)  # [pos, head]
            return x.transpose(0, 1) if "pos" in self.by else x.sum(0)
        x = x.sum(-1).sum(0)  # [pos]
        return x if "pos" in self.by else x.sum()

    # -- scores and the result --------------------------------------------------------------------
    def scores(self, runners) -> tuple[float, float]:
        clean_logits = self.run_logits("clean", runners)
        if self.metric.name == "kl":
            self.metric.clean_logprobs = clean_logits.float().log_softmax(-1)
        clean = float(self.metric.aggregate_logits(clean_logits))
        corrupt = float(self.metric.aggregate_logits(self.run_logits("corrupt", runners)))
        return self.checked_scores(clean, corrupt)

    def checked_scores(self, clean: float, corrupt: float) -> tuple[float, float]:
        """The clean and corrupt scores, or an error where a normalised metric is undefined."""
        if self.metric.normalized and abs(clean - corrupt) < 1e-9:
            raise NNPatchValueError(
                f"the clean and corrupt runs have the same logit difference ({clean:.6g}), so the "
                "normalised logit difference is undefined; check answer/wrong, or use "
                "metric='logit_diff_raw'")
        return clean, corrupt

    def run_logits(self, which: str, runners) -> torch.Tensor:
        out = torch.empty(self.n_pairs, self.vocab)
        for e in runners:
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


def _check_by(by, site: str, first: Site) -> tuple[str, ...]:
    if isinstance(by, str):
        by = tuple(part.strip() for part in by.split(",") if part.strip())
    by = tuple(by)
    if by not in BY:
        raise NNPatchValueError(f"by={by} is not a sweep shape; choose one of {', '.join(map(str, BY))}")
    if "head" in by and not first.heads:
        raise NNPatchValueError(
            f"by={by} splits the site into attention heads, but site {site!r} ({first}) has no heads; "
            "use site='head_out' (each head's output before the attention output projection)")
    return by


def _check_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    out = []
    for layer in layers:
        if not -n_layers <= int(layer) < n_layers:
            raise NNPatchIndexError(f"layer {layer} is out of range; the model has {n_layers} layers")
        out.append(int(layer) % n_layers)
    return out


def _vocab_size(module: torch.nn.Module) -> int:
    config = getattr(module, "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None:
        raise NNPatchAttributeError(f"{type(module).__name__} has no config.vocab_size; sweeps read next-token logits")
    return int(size)


class CellSink:
    """Collects per-row statistics into per-cell values as chunks finish, and each pair's clean
    and corrupt scores as its reference runs finish.

    For a registry metric a cell's value is the mean of its rows' statistics, so the sink keeps
    `stats` [cells, pairs] with `have` [cells, pairs] (which rows are in) and `reference`
    [2, pairs] (clean and corrupt statistic of each pair) with `have_reference` [pairs]: plain
    tensors that a checkpoint stores and ranks add up. A custom metric needs all of a cell's
    logits at once, so the sink keeps logits until a cell is complete."""

    def __init__(self, job: Job, n_cells: int):
        self.job, self.n_cells = job, n_cells
        self.have = torch.zeros(n_cells, job.n_pairs, dtype=torch.bool)
        self.have_reference = torch.zeros(job.n_pairs, dtype=torch.bool)
        if job.metric.fn is None:
            self.stats = torch.zeros(n_cells, job.n_pairs)
            self.reference = torch.zeros(2, job.n_pairs)
        else:
            self.pending: dict[int, dict[int, torch.Tensor]] = {}
            self.done = torch.zeros(n_cells)
            self.reference_logits = torch.zeros(2, job.n_pairs, job.vocab)

    def add_reference(self, group: Group, clean_logits: torch.Tensor, corrupt_logits: torch.Tensor) -> None:
        """A group's clean and corrupt last-position logits `[n, vocab]`."""
        metric = self.job.metric
        if metric.spec is not None and metric.spec.needs_clean:
            metric.note_clean(group.pairs, clean_logits)
        if metric.fn is not None:
            self.reference_logits[0, group.pairs] = clean_logits.float().cpu()
            self.reference_logits[1, group.pairs] = corrupt_logits.float().cpu()
        else:
            every = list(range(group.n))
            self.reference[0, group.pairs] = metric.row_stats(clean_logits, group, every).float().cpu()
            self.reference[1, group.pairs] = metric.row_stats(corrupt_logits, group, every).float().cpu()
        self.have_reference[group.pairs] = True

    def scores(self) -> tuple[float, float]:
        """The clean and corrupt scores over all pairs (every pair's reference runs are in)."""
        if self.job.metric.fn is not None:
            clean, corrupt = (float(self.job.metric.fn(lg)) for lg in self.reference_logits)
        else:
            clean, corrupt = (float(r.mean()) for r in self.reference)
        return self.job.checked_scores(clean, corrupt)

    def add(self, group: Group, rows: list[Row], stats: torch.Tensor) -> None:
        cells = torch.tensor([r.cell for r in rows])
        pairs = torch.tensor([group.pairs[r.pair] for r in rows])
        self.have[cells, pairs] = True
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
