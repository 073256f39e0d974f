"""Causal tracing with noise (as in ROME): the corrupt run is the clean prompt itself with Gaussian
noise added to the input embeddings of its subject tokens, so no second prompt is needed.

    >>> import nnpatch
    >>> model = nnpatch.models.load("ioi")
    >>> prompt = "When Mary and John went to the store, John gave a drink to"
    >>> r = nnpatch.noise_patching(model, prompt, subject=" John gave", answer=" Mary", wrong=" John",
    ...                            progress=False)
    >>> r.dims, r.subject, round(r.noise, 4)
    (('layer', 'pos'), [[9, 10]], 0.2863)

`mode="denoise"` (the default) restores each cell's clean activation into the noisy run: a cell
near 1 carries what the noise destroyed. `mode="noise"` patches the noisy activation into the
clean run: a cell near 0 is one the clean behaviour needs. Cells are scored and normalised as in
`activation_patching` (clean 1, noisy 0 for `logit_diff`); the sweep is the same batched sweep,
with the noisy run's embeddings changed by a hook on the model's input embedding module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..engine import Model
from ..engine.hooks import exclusive
from ..errors import NNPatchIndexError, NNPatchTypeError, NNPatchValueError
from .api import _sweep
from .job import CellSink, Job
from .memory import Budget
from .pairs import as_list, from_task_pairs
from .result import PatchingResult

NOISE_STDS = 3.0  # the default noise: this many standard deviations of the embedding matrix's entries


@dataclass
class NoisePatchingResult(PatchingResult):
    """A `PatchingResult` whose corrupt run is the clean prompt with noise on its subject tokens:
    `noise` is the noise's standard deviation, `subject` each prompt's noised token positions,
    `seed` the seed of the draw. `save` keeps them too; read such a file back with
    `NoisePatchingResult.load` (`PatchingResult.load` reads the grid and the usual fields)."""

    noise: float = 0.0
    subject: list[list[int]] = field(default_factory=list)
    seed: int = 0

    _EXTRA = {"noise": (int, float), "subject": list, "seed": int}

    def __post_init__(self):
        super().__post_init__()
        if not all(isinstance(s, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in s)
                   for s in self.subject):
            raise NNPatchValueError("subject must be one list of token positions (ints) per prompt, "
                                    f"got {self.subject!r}")

    def plot(self, **kwargs):
        kwargs.setdefault("title", f"Causal tracing ({self.direction}) of {self.site} by {' x '.join(self.dims)}: "
                                   f"noise std {self.noise:.3g} on the subject tokens")
        return super().plot(**kwargs)

    def __repr__(self) -> str:
        plain = super().__repr__().replace("PatchingResult(activation patching",
                                           "NoisePatchingResult(noise patching", 1)
        return plain[:-1] + f", noise std {self.noise:.4g} on tokens {self.subject})"


def noise_patching(model, prompts, *, subject, noise: float | None = None, seed: int = 0,
                   site: str = "resid_pre", by: Sequence[str] | str = ("layer", "pos"), mode: str = "denoise",
                   answer=None, wrong=None, metric: str | Callable = "logit_diff",
                   layers: Sequence[int] | None = None, batch_size: int | None = None,
                   progress: bool | Callable[[int, int], None] = True) -> NoisePatchingResult:
    """Causal tracing: patch every cell of a site between each prompt's clean run and its run with
    noise on the subject tokens' input embeddings.

    `prompts` is a prompt, a list of prompts, or task pairs (their clean prompts, answers and wrong
    tokens are used). `subject` says which tokens get noise: a substring of the prompt (every token
    overlapping its first occurrence), a list of token positions (negative ones count from the
    end), or one of these per prompt. `noise` is the noise's standard deviation; the default is 3
    times the standard deviation of the entries of the model's input embedding matrix (ROME
    measures it on subject embeddings of a corpus; the embedding matrix needs no data). The noise
    of prompt i is the i-th draw of shape [subject tokens, hidden size] from a normal
    `torch.Generator` seeded with `seed`, times `noise`; every run of that prompt uses the same draw.

    `mode="denoise"` patches clean activations into the noisy run, `"noise"` noisy activations into
    the clean run. `site`, `by`, `answer`, `wrong`, `metric`, `layers`, `batch_size` and `progress`
    are as in `activation_patching`, with the noisy run as the corrupt run.

        >>> import nnpatch
        >>> model = nnpatch.models.load("ioi")
        >>> r = nnpatch.noise_patching(model, nnpatch.tasks.ioi(2, template=0), subject=[2], site="mlp_out",
        ...                            by="layer", progress=False)
        >>> r.values.shape, r.subject
        (torch.Size([4]), [[2], [2]])
    """
    module = model.module if isinstance(model, Model) else model
    prompts, _, answer, wrong = from_task_pairs(prompts, None, answer, wrong)
    prompts = as_list(prompts)
    if not prompts:
        raise NNPatchValueError("no prompts given")
    with exclusive(module):
        job = Job(model, prompts, prompts, answer, wrong, metric, site, by, mode, layers)
        default = default_noise(module)
        if default is None:
            raise NNPatchTypeError(f"{type(module).__name__} has no get_input_embeddings() with a weight; noise "
                                   "patching adds noise to the input embeddings of a Hugging Face model")
        scale = default if noise is None else float(noise)
        if not scale > 0:
            raise NNPatchValueError(f"noise must be a positive standard deviation, got {noise!r}")
        positions = subject_positions(model, prompts, job.clean_ids, subject)
        d_model = module.get_input_embeddings().weight.shape[-1]
        offsets = _noise(positions, job.clean_ids, d_model, scale, seed)
        for group in job.groups:
            noisy = torch.stack([offsets[i] for i in group.pairs]).to(job.device)  # [n, pos, d]
            group.noise = (None, noisy)  # the corrupt run is the noisy clean run
        cells = list(enumerate(job.cells()))
        sink = CellSink(job, len(cells))
        _sweep(job, Budget(job), cells, None, sink, None, batch_size, progress, None)
    clean_score, noisy_score = sink.scores()
    values = job.normalize(sink.values(), clean_score, noisy_score)
    base = job.result(values, clean_score, noisy_score, "activation")
    return NoisePatchingResult(**{f: getattr(base, f) for f in base.__dataclass_fields__},
                               noise=scale, subject=positions, seed=seed)


def default_noise(module: torch.nn.Module) -> float | None:
    """The default noise std: NOISE_STDS x the std of the input embedding matrix's entries (None
    for a module without `get_input_embeddings()` with a weight).

        >>> import nnpatch
        >>> round(default_noise(nnpatch.models.load("ioi").module), 3) > 0
        True
    """
    get = getattr(module, "get_input_embeddings", None)
    weight = getattr(get() if callable(get) else None, "weight", None)
    return NOISE_STDS * float(weight.detach().float().std()) if isinstance(weight, torch.Tensor) else None


def subject_positions(model, prompts: list, prompt_ids: list[list[int]], subject) -> list[list[int]]:
    """Each prompt's subject token positions (sorted, non-negative) from `subject` as
    `noise_patching` takes it: a string or a list of positions for every prompt, or a list with
    one string or position list per prompt."""
    n = len(prompt_ids)
    per_prompt = isinstance(subject, (list, tuple)) and bool(subject) and \
        all(isinstance(s, (str, list, tuple)) for s in subject)
    if per_prompt and len(subject) != n:
        raise NNPatchValueError(f"subject gives {len(subject)} subjects for {n} prompts; give one per prompt, "
                                "or one string or position list for all")
    subjects = list(subject) if per_prompt else [subject] * n
    return [_positions(model, prompt, ids, s, i)
            for i, (prompt, ids, s) in enumerate(zip(prompts, prompt_ids, subjects))]


def _positions(model, prompt, ids: list[int], subject, i: int) -> list[int]:
    tokenizer = getattr(model, "tokenizer", None)
    tokens = [tokenizer.decode([t]) for t in ids] if tokenizer is not None else [str(t) for t in ids]
    if isinstance(subject, str):
        text, spans = _spans(tokenizer, prompt, ids, tokens)
        start = text.find(subject) if subject else -1
        if start < 0:
            raise NNPatchValueError(f"subject {subject!r} does not occur in prompt {i} ({text!r}); give a piece "
                                    f"of the prompt or token positions (its tokens: {tokens})")
        return [p for p, (a, b) in enumerate(spans) if a < start + len(subject) and b > start]
    if isinstance(subject, int) and not isinstance(subject, bool):
        subject = [subject]
    if not isinstance(subject, (list, tuple)) or not subject or \
            not all(isinstance(p, int) and not isinstance(p, bool) for p in subject):
        raise NNPatchTypeError(f"subject must be a piece of the prompt or a non-empty list of token positions, "
                               f"got {subject!r}")
    out = set()
    for p in subject:
        if not -len(ids) <= p < len(ids):
            raise NNPatchIndexError(f"subject position {p} is out of range for prompt {i}, which has {len(ids)} "
                                    f"tokens (positions 0..{len(ids) - 1}): {tokens}")
        out.add(p % len(ids))
    return sorted(out)


def _spans(tokenizer, prompt, ids: list[int], tokens: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The text a subject is looked up in and each token's (start, end) in it: the prompt with a
    fast tokenizer's offsets, else the tokens' decoded strings end to end."""
    if isinstance(prompt, str) and tokenizer is not None:
        try:
            enc = tokenizer(prompt, return_offsets_mapping=True)
            if list(enc["input_ids"]) == list(ids):
                return prompt, [tuple(s) for s in enc["offset_mapping"]]
        except (NotImplementedError, TypeError, ValueError, KeyError):
            pass
    ends = torch.tensor([len(t) for t in tokens]).cumsum(0).tolist()
    return "".join(tokens), [(e - len(t), e) for e, t in zip(ends, tokens)]


def _noise(positions: list[list[int]], ids: list[list[int]], d: int, scale: float, seed: int) -> list[torch.Tensor]:
    """Per prompt: [pos, d] zeros, with scaled Gaussian noise at its subject positions."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for pos, prompt in zip(positions, ids):
        offset = torch.zeros(len(prompt), d)
        offset[pos] = torch.randn(len(pos), d, generator=gen) * scale
        out.append(offset)
    return out
