"""Random-weight models built from transformers configs (no downloads) and a word-level tokenizer."""
import pathlib
import sys
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 60
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def word_tokenizer():
    words = ["<pad>", "<bos>"] + [f"t{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<bos>", unk_token="<pad>")


def gpt2(n_layer=3, d=32, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=d, n_head=4, vocab_size=VOCAB, n_positions=64,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def llama(n_layer=3, d=32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=n_layer, hidden_size=d, intermediate_size=2 * d,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def prompt(*ids):
    return " ".join(f"t{i}" for i in ids)


def ids(text):
    return torch.tensor([[int(w[1:]) + 2 for w in text.split()]])


def blocks(hf):
    """The decoder blocks of a GPT-2 or Llama model, and the envoy path prefix."""
    if hasattr(hf, "transformer"):
        return hf.transformer.h
    return hf.model.layers


def hooked_forward(hf, text, module_hooks):
    """Logits of a plain forward with `(module, forward_hook)` pairs attached; the hand-written
    reference the engine's results are compared with."""
    handles = [module.register_forward_hook(hook) for module, hook in module_hooks]
    try:
        with torch.no_grad():
            return hf(ids(text)).logits
    finally:
        for h in handles:
            h.remove()


def first(output):
    """A block's hidden state: its output, or the first element of a tuple output."""
    return output[0] if isinstance(output, tuple) else output


def block_outputs(hf, text, edits=None):
    """Logits and every block's output of a plain forward; `edits[i](h) -> h` replaces block
    i's hidden state (the reference the engine's traces are compared with)."""
    outs, handles = {}, []
    for i, block in enumerate(blocks(hf)):
        def keep(m, a, o, i=i):
            h = first(o)
            if edits and i in edits:
                h = edits[i](h.clone())
            outs[i] = h.detach().clone()
            return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h
        handles.append(block.register_forward_hook(keep))
    try:
        with torch.no_grad():
            logits = hf(ids(text)).logits
    finally:
        for h in handles:
            h.remove()
    return logits, outs


def close(a, b, tol=1e-5):
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=tol, rtol=tol)


def block_envoys(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def all_hooks(module):
    """Every hook attached anywhere in a module tree (must be empty after a trace)."""
    n = 0
    for m in module.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    return n


# -- the plain-hook activation-patching reference -------------------------------------------------
# Test modules say where each site is with their own hand-written table of path templates, per
# architecture (never read from nnpatch's site table, which is the code under test):
#
#     {"resid_pre": "transformer.h.{i}.input", "mlp_out": "transformer.h.{i}.mlp.output",
#      "resid_mid": "transformer.h.{i}.ln_2.input = transformer.h.{i}.input + transformer.h.{i}.attn.output"}
#
# "X.input" / "X.output" is the first positional argument (or `hidden_states=`) / the output (its
# first element when a tuple) of module X. "READ = STREAM + VIA" is a value that no module outputs:
# it is read at READ and written through VIA, as the wanted value minus STREAM.


class Place(NamedTuple):
    """Where a site's value is read and how it is written: (module, "input" | "output"), and for a
    value no module outputs, `via` (module, kind) is written as the wanted value minus `stream`."""
    module: torch.nn.Module
    kind: str
    via: tuple | None = None
    stream: tuple | None = None


def site_places(hf, table, n_layers=None):
    """{(site, layer): Place} of every site in `table` (see above) and every layer."""
    def at(spec, layer):
        path, kind = spec.strip().format(i=layer).rsplit(".", 1)
        assert kind in ("input", "output"), spec
        return hf.get_submodule(path), kind

    out = {}
    for layer in range(hf.config.num_hidden_layers if n_layers is None else n_layers):
        for site, spec in table.items():
            read, _, written = spec.partition("=")
            if written:
                stream, via = written.split("+")
                out[site, layer] = Place(*at(read, layer), via=at(via, layer), stream=at(stream, layer))
            else:
                out[site, layer] = Place(*at(read, layer))
    return out


def hook(module, kind, fn):
    """Attach `fn(value) -> new value | None` to a module's input or output; returns the handle."""
    if kind == "input":
        def pre(m, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new,) + args[1:], kwargs)
            new = fn(kwargs["hidden_states"])  # some blocks pass their hidden state by keyword
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(m, args, out):
        new = fn(out[0] if isinstance(out, tuple) else out)
        if new is None:
            return None
        return (new,) + out[1:] if isinstance(out, tuple) else new
    return module.register_forward_hook(post)


def last_logits(hf, tokens, hooks=()):
    """Last-position logits [vocab] of one prompt (a list of token ids), with `(module, kind, fn)`
    hooks attached for this forward only."""
    handles = [hook(*h) for h in hooks]
    try:
        with torch.no_grad():
            out = hf(torch.tensor([tokens]))
    finally:
        for h in reversed(handles):
            h.remove()
    return getattr(out, "logits", out)[0, -1]


def sweep_cells(by, shape):
    """Each single cell of a sweep over the axes `by` (shape: {axis: size}), in row-major order,
    as groups of one cell: [[{"layer": 0, "pos": 0}], [{"layer": 0, "pos": 1}], ...]."""
    grid = torch.cartesian_prod(*[torch.arange(shape[d]) for d in by]).reshape(-1, len(by))
    return [[dict(zip(by, map(int, row)))] for row in grid]


def patching_reference(hf, places, clean, corrupt, cells, *, site, answer=None, wrong=None,
                       metric="logit_diff", direction="denoise", n_heads=None):
    """Activation patching written out: one plain forward per group of cells and prompt pair.

    `places` is {(site, layer): Place} (from `site_places(hf, table)`); `clean`/`corrupt` are lists of
    token-id lists, paired by index. Each group in `cells` is a list of cells patched together,
    {"layer": l} plus optionally "pos" (else every position) and "head" (that head's slice of the
    last dimension). Denoising patches the clean run's values into the corrupt run; noising the
    reverse. `metric` is "logit_diff" (normalised: 0 = corrupt, 1 = clean), "logit_diff_raw",
    "prob", "kl" (from the clean run) or a function of the pairs' logits [pairs, vocab].

    Returns values [groups] (the metric), scores [groups] (before normalising), clean_score,
    corrupt_score, and the last-position logits clean_logits / corrupt_logits [pairs, vocab] and
    patched_logits [groups, pairs, vocab].
    """
    n_heads = getattr(hf.config, "num_attention_heads", None) if n_heads is None else n_heads
    n_pairs = len(clean)
    if answer is not None and not isinstance(answer, (list, tuple)):
        answer, wrong = [answer] * n_pairs, [wrong] * n_pairs
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    clean_logits = torch.stack([last_logits(hf, p) for p in clean])
    corrupt_logits = torch.stack([last_logits(hf, p) for p in corrupt])

    def score(logits):  # [pairs, vocab] -> float
        if callable(metric):
            return float(metric(logits))
        stats = []
        for i, lg in enumerate(logits):
            if metric in ("logit_diff", "logit_diff_raw"):
                stats.append(float(lg[answer[i]] - lg[wrong[i]]))
            elif metric == "prob":
                stats.append(float(lg.softmax(-1)[answer[i]]))
            else:
                assert metric == "kl", metric
                p = clean_logits[i].log_softmax(-1)
                stats.append(float((p.exp() * (p - lg.log_softmax(-1))).sum()))
        return sum(stats) / len(stats)

    # The source run's value at every place the cells patch: one recording forward per source prompt.
    layers = sorted({cell["layer"] for group in cells for cell in group})
    saved = []
    for prompt in source:
        seen = {}
        reads = [(*places[site, layer][:2], lambda v, key=layer, seen=seen: seen.__setitem__(key, v.clone()))
                 for layer in layers]
        last_logits(hf, prompt, reads)
        saved.append(seen)

    def edit(src, group, stream=None):
        def fn(value):
            value = value.clone()
            for cell in group:
                pos = cell.get("pos", slice(None))
                if "head" in cell:
                    assert stream is None
                    value.view(*value.shape[:-1], n_heads, -1)[:, pos, cell["head"]] = \
                        src.view(*src.shape[:-1], n_heads, -1)[:, pos, cell["head"]]
                else:
                    value[:, pos] = src[:, pos] - (0 if stream is None else stream["x"][:, pos])
            return value
        return fn

    patched = []
    for group in cells:
        by_layer = {}
        for cell in group:
            by_layer.setdefault(cell["layer"], []).append(cell)
        logits = []
        for i, prompt in enumerate(base):
            hooks = []
            for layer, here in by_layer.items():
                place = places[site, layer]
                if place.via is None:
                    hooks.append((place.module, place.kind, edit(saved[i][layer], here)))
                else:  # write through `via`: the wanted value minus the stream it is added to
                    stream = {}
                    hooks.append((*place.stream, lambda v, stream=stream: stream.__setitem__("x", v)))
                    hooks.append((*place.via, edit(saved[i][layer], here, stream)))
            logits.append(last_logits(hf, prompt, hooks))
        patched.append(torch.stack(logits))

    clean_score, corrupt_score = score(clean_logits), score(corrupt_logits)
    scores = torch.tensor([score(lg) for lg in patched], dtype=torch.float64)
    values = (scores - corrupt_score) / (clean_score - corrupt_score) if metric == "logit_diff" else scores
    return SimpleNamespace(values=values, scores=scores, clean_score=clean_score, corrupt_score=corrupt_score,
                           clean_logits=clean_logits, corrupt_logits=corrupt_logits,
                           patched_logits=torch.stack(patched) if patched else torch.zeros(0))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, which only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["gpt2", "llama"])
def arch(request):
    return request.param


@pytest.fixture
def hf(arch):
    return gpt2() if arch == "gpt2" else llama()


@pytest.fixture
def tok():
    return word_tokenizer()


@pytest.fixture
def lm(hf, tok):
    import nnpatch
    return nnpatch.LanguageModel(hf, tokenizer=tok)


sys.path.insert(0, str(pathlib.Path(__file__).parent))
