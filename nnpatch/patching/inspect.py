"""What a researcher opens after a patching heatmap: one head's attention pattern, every head's
direct logit attribution, and the logit lens of a run (optionally a patched run).

    >>> import nnpatch
    >>> model = nnpatch.models.load("ioi")
    >>> clean = "When Mary and John went to the store, John gave a drink to"
    >>> pattern = nnpatch.attention_pattern(model, clean, layer=2, head=1)
    >>> pattern.weights.shape, pattern.tokens[-1]
    (torch.Size([14, 14]), ' to')
    >>> nnpatch.head_logit_attribution(model, clean, " Mary", " John").shape    # [layers, heads]
    torch.Size([4, 4])
    >>> lens = nnpatch.logit_lens(model, clean, " Mary")
    >>> lens.layers[0], lens.top_tokens[-1][-1]
    ('embed', ' Mary')

Each function runs the model once (the lens of a patched run: three times) with plain hooks and
reads module paths from the standard site table (`sites.py`) and the circuit graph's final norm
(`graph.py`), so it covers the architectures those tables know.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from ..engine import Model
from ..engine.hooks import exclusive, hooks, resolve
from ..engine.inputs import Prompts, check_prompts, model_limits, token_id, token_rows
from ..engine.devices import input_device
from ..errors import NNPatchError, NNPatchIndexError, NNPatchTypeError, NNPatchValueError
from .graph import graph, weight_matrix
from .job import BY, Job, Row
from .runner import Runner
from .sites import Site, Sites, sites


@dataclass
class AttentionPattern:
    """One head's attention on one prompt: `weights[q, k]` is how much query position q
    attends to key position k (each row sums to 1; a causal model's upper triangle is 0)."""

    tokens: list[str]
    weights: torch.Tensor  # [query_pos, key_pos], float32 on the CPU
    layer: int
    head: int


def attention_pattern(model, prompt, layer: int, head: int) -> AttentionPattern:
    """The attention weights of head `head` of layer `layer` on `prompt` (one prompt).

    The weights are the ones the model computes: its attention module's own output, read with a
    hook. Models that run a fused attention kernel (PyTorch's sdpa, flash attention) do not
    return weights, so for this one forward the model is switched to its eager attention (the
    same computation, written out) and switched back afterwards, whatever happens.

        >>> import nnpatch
        >>> p = nnpatch.attention_pattern(nnpatch.models.load("ioi"), "When Mary and John went", 0, 3)
        >>> [round(float(s), 4) for s in p.weights.sum(-1)]
        [1.0, 1.0, 1.0, 1.0, 1.0]
    """
    lm, module, table = _unpack(model)
    layer = _index(layer, table.n_layers, "layer")
    head = _index(head, table.n_heads, "head")
    path = _attention_path(table, layer)
    ids = _prompt_ids(lm, module, prompt)
    seen = {}

    def keep(mod, args, kwargs, output):
        seen["weights"] = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
    with exclusive(module), _eager_attention(module), torch.no_grad(), hooks(module, [(path, "output", keep)]):
        module(input_ids=_tensor(module, ids))
    weights = seen.get("weights")
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
        raise NNPatchError(f"{path} returned no attention weights [batch, heads, query, key] even with eager "
                           "attention; attention_pattern needs an attention module that returns them "
                           "as the second element of its output, as Hugging Face's do")
    return AttentionPattern(_str_tokens(lm, ids), weights[0, head].detach().float().cpu(), layer, head)


def head_logit_attribution(model, prompt, answer, wrong) -> torch.Tensor:
    """Each head's direct effect on logit(answer) - logit(wrong) at the last position: `[layers, heads]`.

    A head's output is its slice of the attention output projection (`head_out` times the
    projection's rows for that head, without the projection's bias), at the last position. It
    reaches the logits through the final norm and the unembedding; the final norm's scale (its
    division by the residual stream's standard deviation or root mean square) is frozen at its
    value in this run, which makes the norm linear. The direct effects of all heads, of the
    attention biases, the MLPs and the embeddings, plus the norm's and the unembedding's biases,
    then add up to the run's logit difference exactly.

        >>> import nnpatch
        >>> model = nnpatch.models.load("ioi")
        >>> dla = nnpatch.head_logit_attribution(model,
        ...     "When Mary and John went to the store, John gave a drink to", " Mary", " John")
        >>> dla.shape, bool(dla.abs().sum() > 0)
        (torch.Size([4, 4]), True)
    """
    lm, module, table = _unpack(model)
    g = _graph(module, "head_logit_attribution")
    ids = _prompt_ids(lm, module, prompt)
    a = token_id(lm.tokenizer, answer, what="answer", vocab_size=_vocab(module))
    w = token_id(lm.tokenizer, wrong, what="wrong token", vocab_size=_vocab(module))
    unembed = _unembed(module, table)
    heads: dict[int, torch.Tensor] = {}
    final: dict[str, torch.Tensor] = {}
    specs = [(site.path, site.kind, _keep_last(site, heads, layer)) for layer, site in enumerate(g.head_sites)]
    specs += [(g.final_norm, kind, _keep_last(Site(g.final_norm, kind), final, kind)) for kind in ("input", "output")]
    with exclusive(module), torch.no_grad(), hooks(module, specs):
        module(input_ids=_tensor(module, ids))
    norm = FrozenNorm(resolve(module, g.final_norm), final["input"], g.final_norm)
    norm.check(final["output"])
    u = _linear(unembed, table.unembed)  # [d, vocab]
    direction = (u[:, a] - u[:, w]).float()  # [d]
    out = torch.zeros(g.n_layers, g.n_heads)
    for layer, site in enumerate(g.head_sites):
        w_o = _linear(resolve(module, site.path), site.path).float()  # [heads * head_dim, d]
        z = heads[layer].float().reshape(g.n_heads, -1)  # [heads, head_dim]
        per_head = torch.einsum("hk,hkd->hd", z.to(w_o.device), w_o.reshape(g.n_heads, -1, w_o.shape[-1]))
        out[layer] = (norm(per_head.to(norm.gain.device)) @ direction.to(norm.gain.device)).cpu()
    return out


class FrozenNorm:
    """A final LayerNorm or RMSNorm with its scale frozen at its value for the residual `x` [d]:
    a linear map (`norm(c)`) plus the norm's own bias (`bias`), so that norm(x) = frozen(x) + bias
    and frozen(a + b) = frozen(a) + frozen(b)."""

    def __init__(self, module: torch.nn.Module, x: torch.Tensor, path: str):
        self.path, x = path, x.detach().float()
        weight = getattr(module, "weight", None)
        d = x.shape[-1]
        if isinstance(module, torch.nn.LayerNorm):
            self.centre, eps = True, module.eps
            self.bias = torch.zeros(d) if module.bias is None else module.bias.detach().float()
        elif "RMSNorm" in type(module).__name__ and weight is not None:
            self.centre, eps = False, getattr(module, "variance_epsilon", getattr(module, "eps", None))
            self.bias = torch.zeros(d)
            if type(module).__name__.startswith("Gemma"):  # Gemma scales by (1 + weight)
                weight = weight + 1
        else:
            raise NNPatchTypeError(f"the final norm {path!r} is a {type(module).__name__}; a frozen-scale "
                                   "attribution knows torch LayerNorm and Hugging Face RMSNorm modules")
        centred = x - x.mean(-1, keepdim=True) if self.centre else x
        scale = (centred.pow(2).mean(-1) + float(eps or 0.0)).sqrt()  # the frozen scale
        gain = torch.ones(d) if weight is None else weight.detach().float()
        self.gain = gain.to(x.device) / scale
        self.bias = self.bias.to(x.device)
        self.x = x

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        c = c.float()
        if self.centre:
            c = c - c.mean(-1, keepdim=True)
        return c * self.gain

    def check(self, y: torch.Tensor) -> None:
        """The frozen map must give back the norm's real output `y` for the residual it froze at."""
        y = y.detach().float().to(self.x.device)
        if not torch.allclose(self(self.x) + self.bias, y, rtol=1e-3, atol=1e-3 * float(y.abs().max()) + 1e-5):
            raise NNPatchValueError(f"the final norm {self.path!r} does not compute a LayerNorm or RMSNorm of "
                                    "its input as nnpatch writes it out, so its frozen-scale version would be "
                                    "wrong; head_logit_attribution cannot attribute through it")


@dataclass
class LogitLens:
    """The residual stream after the embeddings and after each block, read through the final
    norm and the unembedding: per row (`layers`) and position, the top token, its probability,
    and the answer's probability (None without an answer)."""

    tokens: list[str]
    layers: list[str]  # "embed", then the block numbers "0", "1", ...
    top_tokens: list[list[str]]  # [rows][pos]
    top_probs: torch.Tensor  # [rows, pos]
    answer_probs: torch.Tensor | None  # [rows, pos]
    answer: str | None = None
    patch: str = ""  # which patched run this is ("" for the prompt's own run)


def logit_lens(model, prompt, answer=None, *, patch: dict | None = None) -> LogitLens:
    """The logit lens of `prompt`'s run, or of a patched run of it.

    Rows are the residual stream after the embeddings (`embed`, block 0's input) and after each
    block; each goes through the model's final norm and unembedding as the last one does, so the
    last row is the model's real next-token distribution. `answer` (a token) adds its
    probability per cell.

    `patch=dict(source=other_prompt, site="resid_pre", cell=(layer, pos))` shows the run of
    `prompt` with one cell patched from `source`'s run, exactly as `activation_patching` patches
    a cell (`prompt` is the run patched, as the corrupt prompt when denoising). `cell` follows
    `by`, which defaults from its length: (layer,), (layer, pos), or on site "head_out"
    (layer, head); (layer, head, pos). Give `by=` in the dict for (layer, pos) on head_out.

        >>> import nnpatch
        >>> model = nnpatch.models.load("ioi")
        >>> clean = "When Mary and John went to the store, John gave a drink to"
        >>> corrupt = "When Mary and John went to the store, Mary gave a drink to"
        >>> lens = nnpatch.logit_lens(model, corrupt, " Mary", patch=dict(source=clean, site="resid_pre", cell=(2, -1)))
        >>> lens.top_tokens[-1][-1], lens.patch
        (' Mary', 'resid_pre (layer 2, pos -1) from the source prompt')
    """
    lm, module, table = _unpack(model)
    g = _graph(module, "logit_lens")
    ids = _prompt_ids(lm, module, prompt)
    a = None if answer is None else token_id(lm.tokenizer, answer, what="answer", vocab_size=_vocab(module))
    rows: dict[int, torch.Tensor] = {}
    first = table["resid_pre"][0]
    keep = [(first.path, first.kind, _keep_all(first, rows, 0))]
    keep += [(s.path, s.kind, _keep_all(s, rows, i + 1)) for i, s in enumerate(table["resid_post"])]
    with exclusive(module), torch.no_grad():
        if patch is None:
            with hooks(module, keep):
                module(input_ids=_tensor(module, ids))
            described = ""
        else:
            described = _patched_run(lm, prompt, patch, keep)
        resid = torch.stack([rows[i] for i in range(len(rows))])  # [rows, pos, d]
        logits = _unembed(module, table)(resolve(module, g.final_norm)(resid)).float()  # [rows, pos, vocab]
    softcap = getattr(getattr(module, "config", None), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    probs = logits.softmax(-1).cpu()
    top_p, top_i = probs.max(-1)  # [rows, pos]
    decode = lm.tokenizer.decode
    return LogitLens(_str_tokens(lm, ids), ["embed"] + [str(i) for i in range(table.n_layers)],
                     [[decode([i]) for i in row] for row in top_i.tolist()], top_p,
                     None if a is None else probs[..., a], None if a is None else decode([a]), described)


def _patched_run(lm, prompt, patch: dict, keep: list) -> str:
    """Run `prompt` with the cell of `patch` taken from its source prompt, with the `keep` hooks
    after the patch's; returns what was patched, in words."""
    if not isinstance(patch, dict) or "source" not in patch or "cell" not in patch:
        raise NNPatchTypeError(f"patch must be a dict with 'source' (a prompt) and 'cell' (e.g. (layer, pos)), "
                               f"plus optionally 'site' and 'by'; got {patch!r}")
    unknown = set(patch) - {"source", "cell", "site", "by"}
    if unknown:
        raise NNPatchTypeError(f"patch has unknown keys {sorted(unknown)}; it takes source, cell, site and by")
    site = patch.get("site", "resid_pre")
    cell = tuple(patch["cell"]) if isinstance(patch["cell"], (tuple, list)) else (patch["cell"],)
    by = patch.get("by") or _default_by(cell, site)
    job = Job(lm, patch["source"], prompt, None, None, _no_metric, site, by, "denoise", None)
    runner = Runner(job, job.groups[0])
    runner.reference_runs()
    rows = [Row(0, (job.patch_of(cell),), 0)]
    specs = runner.patch_specs(rows, torch.zeros(1, dtype=torch.long, device=job.device)) + keep
    with hooks(job.module, specs):
        job.module(input_ids=job.groups[0].base_ids)
    named = ", ".join(f"{d} {i}" for d, i in zip(job.by, cell))
    return f"{site} ({named}) from the source prompt"


def _no_metric(logits):  # the lens reads the residual stream, not a score
    return logits.new_zeros(())


def _default_by(cell: tuple, site: str) -> tuple[str, ...]:
    if len(cell) == 2:
        return ("layer", "head") if site == "head_out" else ("layer", "pos")
    shapes = {len(b): b for b in BY if len(b) != 2}
    if len(cell) not in shapes:
        raise NNPatchValueError(f"cell {cell} has {len(cell)} indices; a cell is (layer,), (layer, pos), "
                                "(layer, head) or (layer, head, pos)")
    return shapes[len(cell)]


# -- shared steps ---------------------------------------------------------------------------------
def _unpack(model) -> tuple[Model, torch.nn.Module, Sites]:
    if not isinstance(model, Model) or getattr(model, "tokenizer", None) is None:
        raise NNPatchTypeError(f"this needs an nnpatch.LanguageModel with its tokenizer (e.g. "
                               f"nnpatch.models.load('ioi')), got {type(model).__name__}")
    return model, model.module, sites(model.module)


def _graph(module, what: str):
    """The circuit graph, which knows the final norm and the heads' output projections."""
    try:
        return graph(module)
    except NNPatchValueError as e:
        raise NNPatchValueError(f"{what} reads the final norm and the attention output projections from the "
                                f"circuit graph's table: {e}") from None


def _index(i, size: int | None, what: str) -> int:
    if size is None:
        raise NNPatchValueError(f"this model's site table does not say how many {what}s it has")
    if isinstance(i, bool) or not isinstance(i, int) and not (isinstance(i, torch.Tensor) and i.numel() == 1):
        raise NNPatchTypeError(f"{what} must be an integer, got {type(i).__name__}")
    i = int(i)
    if not -size <= i < size:
        raise NNPatchIndexError(f"{what} {i} is out of range: the model has {size} {what}s (0..{size - 1})")
    return i % size


def _attention_path(table: Sites, layer: int) -> str:
    """The attention module of a layer: the parent of its output projection (`head_out`)."""
    if "head_out" not in table:
        raise NNPatchValueError(f"{table.architecture}'s site table has no head_out site, so nnpatch cannot "
                                "tell where its attention modules are; add it with nnpatch.register_sites")
    return table["head_out"][layer].path.rpartition(".")[0]


def _prompt_ids(lm, module, prompt) -> list[int]:
    rows = token_rows(lm.tokenizer, prompt)
    if len(rows) != 1:
        raise NNPatchValueError(f"give one prompt, not {len(rows)}")
    vocab, context = model_limits(module)
    check_prompts(Prompts(torch.tensor(rows, dtype=torch.long)), vocab_size=vocab, context=context, where="")
    return rows[0]


def _tensor(module, ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor([list(ids)], dtype=torch.long, device=input_device(module))


def _str_tokens(lm, ids: Sequence[int]) -> list[str]:
    return [lm.tokenizer.decode([i]) for i in ids]


def _vocab(module) -> int | None:
    return getattr(getattr(module, "config", None), "vocab_size", None)


def _unembed(module, table: Sites) -> torch.nn.Module:
    if table.unembed is None:
        raise NNPatchValueError(f"{table.architecture}: no unembedding module known; register it with "
                                "nnpatch.register_sites(..., unembed='lm_head')")
    return resolve(module, table.unembed)


def _reader(site: Site, keep):
    """A hook that calls `keep(value)` with the site's value, changing nothing."""
    if site.kind == "input":
        return lambda module, args, kwargs: keep(site.read(args, kwargs))
    return lambda module, args, kwargs, output: keep(site.read(args, kwargs, output))


def _linear(module: torch.nn.Module, path: str) -> torch.Tensor:
    """A linear module's weight as [in, out]."""
    w = weight_matrix(module)
    if w is None:
        raise NNPatchTypeError(f"{path} is a {type(module).__name__}, not a linear layer; direct logit "
                               "attribution multiplies by its weight matrix")
    return w.detach()


def _keep_last(site: Site, store: dict, key):
    """A hook keeping a site's value at the last position of the one prompt: [d]."""
    return _reader(site, lambda value: store.__setitem__(key, value[0, -1].detach()))


def _keep_all(site: Site, store: dict, key):
    """A hook keeping a site's value of the one prompt: [pos, d]."""
    return _reader(site, lambda value: store.__setitem__(key, value[0].detach()))


@contextlib.contextmanager
def _eager_attention(module: torch.nn.Module):
    """Hugging Face's eager attention for the duration of a with-block (fused kernels return no
    weights), and the model's own attention implementation again afterwards."""
    before = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if before in (None, "eager") or not hasattr(module, "set_attn_implementation"):
        yield
        return
    module.set_attn_implementation("eager")
    try:
        yield
    finally:
        module.set_attn_implementation(before)
