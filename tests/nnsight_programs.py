"""A corpus of nnsight-style intervention programs, run by tests/test_nnsight_differential.py.

Every program is a plain function `program(model, S)` that opens one or more traces on `model`
(an `nnsight.LanguageModel` or an `nnpatch.LanguageModel` wrapping the same weights) and returns a
dict {name: value} of what it saved. The same body runs on both libraries: `S` is a small adapter
that names the model's modules (`S.layers(model)[i]`, `S.attn(model, i)`, ...: GPT-2 and Llama
spell them differently), holds the prompts, and spells the one thing the libraries spell
differently, saving a non-tensor value (`S.save(x)`: `nnsight.save(x)` on nnsight, the value itself
on nnpatch, which keeps every variable). Tensors are saved with `.save()`, as both libraries accept.

Programs run by default on nnsight as the oracle. Programs that nnsight 0.8.1 rejects (or cannot
express) but nnpatch supports by design (patching across invokes without barriers, a consumer
written before its producer, gradients read in any order, trace-level code after the invokes,
...) carry `ref=`: a hand-written plain-PyTorch reference on the same weights (forward hooks,
torch.autograd), returning the same dict. `nnsight_raises=` records the error nnsight gives (or
GIVES_NONE: it runs but saves None), so the test module can check that the program really is
outside nnsight. `xfail=` marks a program nnpatch gets wrong today, with the reason: the defect.

Programs live in this file (not in exec'd strings) because both libraries read trace bodies
from the source file. This file never imports nnsight (the test module runs nnsight in a
subprocess). Write new programs from the libraries' documented behaviour.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

# -- registry -------------------------------------------------------------------------------------

BASE = ("gpt2", "llama")


@dataclasses.dataclass
class Program:
    fn: Callable
    kinds: tuple  # model kinds it runs on (see test_nnsight_differential.KINDS)
    ref: Callable | None  # plain-PyTorch reference; None: nnsight is the oracle
    xfail: dict  # kind -> reason the program currently fails on nnpatch
    nnsight_raises: type | str | None  # for ref programs: what nnsight raises (class or class name)

    @property
    def name(self) -> str:
        return self.fn.__name__


PROGRAMS: list[Program] = []


class GIVES_NONE(Exception):
    """`nnsight_raises=GIVES_NONE`: nnsight runs the program but saves None for a gradient."""


def program(*kinds, ref=None, xfail=None, nnsight_raises=None):
    """Register a program. `xfail` is a reason (every kind) or {kind: reason}."""
    kinds = kinds or BASE

    def register(fn):
        if isinstance(xfail, str):
            marks = {k: xfail for k in kinds}
        else:
            marks = dict(xfail or {})
        PROGRAMS.append(Program(fn, tuple(kinds), ref, marks, nnsight_raises))
        return fn
    return register


# -- the adapter ------------------------------------------------------------------------------------

class Site:
    """Module names, prompts and the `save` spelling for one library and one model.

    Works on wrapped models (envoys) and on the plain Hugging Face module alike, because both
    mirror the module tree; the references use it on the plain module.
    """

    def __init__(self, lib: str, config, tokenizer, prompts: dict, answer: int, wrong: int, save):
        self.lib = lib
        self.gpt2 = config.model_type == "gpt2"
        self.n = config.n_layer if self.gpt2 else config.num_hidden_layers
        self.d = config.n_embd if self.gpt2 else config.hidden_size
        self.heads = config.n_head if self.gpt2 else config.num_attention_heads
        self.head_dim = self.d // self.heads
        self.vocab = config.vocab_size
        self.tokenizer = tokenizer
        self.save = save
        self.ANS, self.WRONG = answer, wrong
        for name, text in prompts.items():
            setattr(self, name, text)

    # module names
    def layers(self, m):
        return m.transformer.h if self.gpt2 else m.model.layers

    def attn(self, m, i):
        return self.layers(m)[i].attn if self.gpt2 else self.layers(m)[i].self_attn

    def o_proj(self, m, i):
        return self.attn(m, i).c_proj if self.gpt2 else self.attn(m, i).o_proj

    def mlp(self, m, i):
        return self.layers(m)[i].mlp

    def act(self, m, i):
        return self.mlp(m, i).act if self.gpt2 else self.mlp(m, i).act_fn

    def mlp_out(self, m, i):
        return self.mlp(m, i).c_proj if self.gpt2 else self.mlp(m, i).down_proj

    def ln1(self, m, i):
        return self.layers(m)[i].ln_1 if self.gpt2 else self.layers(m)[i].input_layernorm

    def ln2(self, m, i):
        return self.layers(m)[i].ln_2 if self.gpt2 else self.layers(m)[i].post_attention_layernorm

    def norm(self, m):
        return m.transformer.ln_f if self.gpt2 else m.model.norm

    def embed(self, m):
        return m.transformer.wte if self.gpt2 else m.model.embed_tokens

    # prompts
    def len(self, text) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def ids(self, text) -> torch.Tensor:
        """Unpadded token ids of one prompt, shape (1, T)."""
        return torch.tensor([self.tokenizer(text)["input_ids"]])

    def vec(self, seed: int, *shape) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*(shape or (self.d,)), generator=g)


def metric(logits, S):
    """The logit difference of the last position, the usual patching metric."""
    return logits[0, -1, S.ANS] - logits[0, -1, S.WRONG]


# -- plain-PyTorch reference helpers ----------------------------------------------------------------

def fwd(hf, ids, out=(), pre=(), grad=False):
    """Logits of a plain forward with hooks. out: [(module, fn(output) -> new or None)];
    pre: [(module, fn(args, kwargs) -> (args, kwargs) or None)]."""
    handles = []
    for module, fn in out:
        handles.append(module.register_forward_hook(lambda m, a, o, fn=fn: fn(o)))
    for module, fn in pre:
        handles.append(module.register_forward_pre_hook(lambda m, a, k, fn=fn: fn(a, k), with_kwargs=True))
    try:
        with torch.set_grad_enabled(grad):
            return hf(ids).logits
    finally:
        for h in handles:
            h.remove()


def keep(store, key, fn=None):
    """An output hook that records a clone of the output (after fn, if any, edits it)."""
    def hook(o):
        if fn is not None:
            new = fn(o)
            o = o if new is None else new
        store[key] = o.clone() if torch.is_tensor(o) else tuple(x.clone() if torch.is_tensor(x) else x for x in o)
        return o
    return hook


def setter(fn):
    """An output hook that edits a clone of a tensor output with fn(t) (in place or returned)."""
    def hook(o):
        t = o.clone()
        new = fn(t)
        return t if new is None else new
    return hook


def layer_outputs(hf, S, text, edits=None):
    """Logits and every block's output of one prompt; edits: {layer: fn(t)} applied first."""
    edits = edits or {}
    seen = {}
    hooks = [(S.layers(hf)[i], keep(seen, i, setter(edits[i]) if i in edits else None)) for i in range(S.n)]
    return fwd(hf, S.ids(text), hooks), seen


def autograd_of(hf, S, text, sites, objective=metric, edit_forward=None, grad_edits=None):
    """Values and gradients of `objective(logits)` w.r.t. module values of one prompt.

    sites: {key: (module, "output" | "input")}; grad_edits: {key: fn(grad) -> grad} replaces the
    gradient flowing back from that value (a tensor hook)."""
    got = {}
    out, pre = [], []
    for key, (module, kind) in sites.items():
        def record(t, key=key):
            t = t.clone()
            t.retain_grad()
            if grad_edits and key in grad_edits:
                t.register_hook(grad_edits[key])
            got[key] = t
            return t
        if kind == "output":
            def out_fn(o, record=record):
                return record(o) if torch.is_tensor(o) else (record(o[0]),) + tuple(o[1:])
            out.append((module, out_fn))
        else:
            def pre_fn(a, k, record=record):
                if a:
                    return (record(a[0]),) + a[1:], k
                first = next(iter(k))
                return a, {**k, first: record(k[first])}
            pre.append((module, pre_fn))
    if edit_forward:
        out = list(edit_forward) + out
    logits = fwd(hf, S.ids(text), out, pre, grad=True)
    loss = objective(logits, S)
    loss.backward()
    hf.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in got.items()}, {k: v.grad for k, v in got.items()}, logits.detach()


# The xfail reasons shared by several programs.
LOOP_VARIABLE = (
    "invoke bodies run only when the trace body ends, so a trace-level variable the invoke reads (here "
    "the for-loop variable `layer`) has its final value in every invoke (wrong value: every invoke "
    "patches the last layer, and the results dict has only the last key); nnsight binds it where the "
    "invoke is written")


# =================================================================================================
# 1. Reads
# =================================================================================================

@program("gpt2", "llama", "ioi")
def read_block_outputs(model, S):
    with model.trace(S.A):
        h0 = S.layers(model)[0].output.save()
        h1 = S.layers(model)[1].output.save()
        h_last = S.layers(model)[S.n - 1].output.save()
    return {"h0": h0, "h1": h1, "h_last": h_last}


@program()
def read_block_inputs(model, S):
    with model.trace(S.A):
        x0 = S.layers(model)[0].input.save()
        x2 = S.layers(model)[2].input.save()
    return {"x0": x0, "x2": x2}


@program()
def read_block_inputs_tuple(model, S):
    with model.trace(S.B):
        args = S.layers(model)[1].inputs[0]
        first = args[0].save()
    return {"first": first}


@program()
def read_attention_outputs(model, S):
    with model.trace(S.A):
        a0 = S.attn(model, 0).output[0].save()
        a1 = S.attn(model, 1).output[0][:, -1].save()
    return {"a0": a0, "a1": a1}


@program()
def read_attention_input(model, S):
    with model.trace(S.C):
        x = S.attn(model, 1).input.save()
    return {"x": x}


@program()
def read_mlp_outputs(model, S):
    with model.trace(S.A):
        m = []
        for i in range(S.n):
            m.append(S.mlp(model, i).output)
        m = S.save(m)
    return {f"mlp{i}": t for i, t in enumerate(m)}


@program()
def read_mlp_input_and_output(model, S):
    with model.trace(S.B):
        x = S.mlp(model, 2).input.save()
        y = S.mlp(model, 2).output.save()
    return {"x": x, "y": y}


@program()
def read_layernorms(model, S):
    with model.trace(S.A):
        n1 = S.ln1(model, 1).output.save()
        n2 = S.ln2(model, 1).output.save()
        nf = S.norm(model).output.save()
    return {"n1": n1, "n2": n2, "nf": nf}


@program("gpt2", "llama", "ioi")
def read_lm_head(model, S):
    with model.trace(S.A):
        x = model.lm_head.input.save()
        logits = model.lm_head.output.save()
    return {"x": x, "logits": logits}


@program("gpt2", "llama", "ioi")
def read_model_output_logits(model, S):
    with model.trace(S.B):
        logits = model.output.logits.save()
    return {"logits": logits}


@program()
def read_embeddings(model, S):
    with model.trace(S.A):
        e = S.embed(model).output.save()
    return {"e": e}


@program()
def read_mlp_internals(model, S):
    with model.trace(S.C):
        act = S.act(model, 0).output.save()
        down_in = S.mlp_out(model, 0).input.save()
        down_out = S.mlp_out(model, 0).output.save()
    return {"act": act, "down_in": down_in, "down_out": down_out}


@program()
def read_attention_projection_input(model, S):
    with model.trace(S.A):
        heads = S.o_proj(model, 2).input.save()
        proj = S.o_proj(model, 2).output.save()
    return {"heads": heads, "proj": proj}


@program("gpt2")
def read_gpt2_qkv_and_positions(model, S):
    with model.trace(S.A):
        wpe = model.transformer.wpe.output.save()
        drop = model.transformer.drop.output.save()
        qkv = model.transformer.h[0].attn.c_attn.output.save()
    return {"wpe": wpe, "drop": drop, "qkv": qkv}


@program("llama")
def read_llama_projections_and_rotary(model, S):
    with model.trace(S.A):
        cos_sin = model.model.rotary_emb.output
        cos = cos_sin[0].save()
        sin = cos_sin[1].save()
        q = model.model.layers[1].self_attn.q_proj.output.save()
        k = model.model.layers[1].self_attn.k_proj.output.save()
        v = model.model.layers[1].self_attn.v_proj.output.save()
    return {"cos": cos, "sin": sin, "q": q, "k": k, "v": v}


@program()
def read_slices(model, S):
    with model.trace(S.A):
        h = S.layers(model)[1].output
        last = h[:, -1].save()
        window = h[0, 2:4].save()
        first_dims = h[..., :5].save()
        stepped = h[:, ::2, 1::3].save()
    return {"last": last, "window": window, "first_dims": first_dims, "stepped": stepped}


@program()
def read_derived_values(model, S):
    with model.trace(S.B):
        h = S.layers(model)[2].output
        norms = h.norm(dim=-1).save()
        logits = model.lm_head.output
        probs = logits[:, -1].softmax(-1).save()
        top = logits[0, -1].topk(5)
        top_values = top.values.save()
        top_ids = top.indices.save()
        best = logits[0, -1].argmax().save()
    return {"norms": norms, "probs": probs, "top_values": top_values, "top_ids": top_ids, "best": best}


@program("gpt2", "llama", "ioi")
def read_python_scalars(model, S):
    with model.trace(S.A):
        mean = S.save(S.layers(model)[0].output.mean().item())
        best = S.save(model.lm_head.output[0, -1].argmax().item())
    return {"mean": mean, "best": best}


@program()
def read_same_module_twice(model, S):
    with model.trace(S.C):
        a = S.layers(model)[1].output[:, -1].save()
        b = S.layers(model)[1].output[:, 0].save()
    return {"a": a, "b": b}


@program()
def read_everything_in_one_layer_in_order(model, S):
    with model.trace(S.A):
        x = S.layers(model)[1].input.save()
        n1 = S.ln1(model, 1).output.save()
        a = S.attn(model, 1).output[0].save()
        n2 = S.ln2(model, 1).output.save()
        m = S.mlp(model, 1).output.save()
        y = S.layers(model)[1].output.save()
    return {"x": x, "n1": n1, "a": a, "n2": n2, "m": m, "y": y}


@program()
def read_residual_identity(model, S):
    # a block's output is its input plus the attention and MLP contributions
    with model.trace(S.B):
        x = S.layers(model)[0].input
        a = S.attn(model, 0).output[0]
        m = S.mlp(model, 0).output
        y = S.layers(model)[0].output
        gap = (y - (x + a + m)).save()
        y = y.save()
    return {"gap": gap, "y": y}


@program("gpt2", "llama", "ioi")
def read_one_token_prompt(model, S):
    with model.trace(S.ONE):
        h = S.layers(model)[1].output.save()
        logits = model.lm_head.output.save()
    return {"h": h, "logits": logits}


@program()
def read_token_id_input(model, S):
    with model.trace(S.ids(S.A)):
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def read_tokenizer_output_input(model, S):
    with model.trace(S.tokenizer(S.C, return_tensors="pt")):
        h = S.layers(model)[2].output.save()
    return {"h": h}


@program()
def read_prompt_list_in_one_invoke(model, S):
    with model.trace([S.A, S.B]):
        h = S.layers(model)[1].output.save()
        logits = model.lm_head.output.save()
    return {"h": h, "logits": logits}


@program()
def read_prompt_list_of_different_lengths(model, S):
    # both libraries left-pad the shorter prompt of one invoke to its longest prompt
    with model.trace([S.SHORT, S.A]):
        long_row = S.layers(model)[1].output[1].save()
        short_last = model.lm_head.output[0, -1].save()
    return {"long_row": long_row, "short_last": short_last}


@program("gpt2", "llama", "ioi")
def read_with_invoke_block(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            h = S.layers(model)[1].output.save()
            logits = model.lm_head.output[:, -1].save()
    return {"h": h, "logits": logits}


@program()
def read_across_separate_traces(model, S):
    with model.trace(S.A):
        first = S.layers(model)[0].output.save()
    with model.trace(S.B):
        second = S.layers(model)[0].output.save()
    return {"first": first, "second": second}


@program()
def read_logit_lens(model, S):
    with model.trace(S.A):
        lens = []
        for i in range(S.n):
            h = S.layers(model)[i].output
            lens.append(model.lm_head(S.norm(model)(h))[:, -1].softmax(-1))
        lens = S.save(lens)
    return {f"lens{i}": t for i, t in enumerate(lens)}


@program("gpt2", "llama", "ioi")
def read_head_direct_logit_attribution(model, S):
    """Each head's direct effect on logit(ANS) - logit(WRONG) at the last position, written out:
    its slice of the attention output projection's input times that slice's rows of the
    projection, through the final norm with its scale frozen at this run's value, onto the
    unembedding's ANS - WRONG direction (what `nnpatch.head_logit_attribution` returns)."""
    with model.trace(S.A):
        heads = []
        for i in range(S.n):
            heads.append(S.o_proj(model, i).input[0, -1].clone())
        heads = S.save(heads)
        resid = S.norm(model).input[0, -1].save()
    norm = S.norm(model)
    if S.gpt2:  # LayerNorm: centred, divided by the standard deviation
        centre, eps = True, norm.eps
    else:  # RMSNorm: divided by the root mean square
        centre, eps = False, norm.variance_epsilon
    x = resid - resid.mean() if centre else resid
    gain = norm.weight / (x.pow(2).mean() + eps).sqrt()
    unembed = model.lm_head.weight
    direction = unembed[S.ANS] - unembed[S.WRONG]
    dla = torch.zeros(S.n, S.heads)
    for i in range(S.n):
        w_o = S.o_proj(model, i).weight
        w_o = w_o if S.gpt2 else w_o.T  # GPT-2's Conv1D keeps [in, out]; Linear keeps [out, in]
        for h in range(S.heads):
            cut = slice(h * S.head_dim, (h + 1) * S.head_dim)
            c = heads[i][cut] @ w_o[cut]
            c = c - c.mean() if centre else c
            dla[i, h] = (c * gain) @ direction
    return {"dla": dla.detach()}


@program("gpt2", "llama", "ioi")
def read_logit_lens_last_layer_equals_logits(model, S):
    with model.trace(S.B):
        h = S.layers(model)[S.n - 1].output
        lens = model.lm_head(S.norm(model)(h)).save()
        logits = model.lm_head.output.save()
    return {"lens": lens, "logits": logits}


@program()
def read_module_called_on_own_value(model, S):
    # running the layer-2 MLP on layer 1's MLP input, inside the trace
    with model.trace(S.C):
        x = S.mlp(model, 1).input
        again = S.mlp(model, 2)(x).save()
        real = S.mlp(model, 2).output.save()
    return {"again": again, "real": real}


@program()
def read_cosine_between_layers(model, S):
    with model.trace(S.A):
        h0 = S.layers(model)[0].output[0, -1]
        h2 = S.layers(model)[2].output[0, -1]
        cos = torch.nn.functional.cosine_similarity(h0, h2, dim=0).save()
    return {"cos": cos}


# =================================================================================================
# 2. Edits in one invoke
# =================================================================================================

@program("gpt2", "llama", "ioi")
def edit_zero_block_output(model, S):
    with model.trace(S.A):
        S.mlp(model, 0).output[:] = 0
        S.layers(model)[1].output[:, 1:3] = 0
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_zero_last_position(model, S):
    with model.trace(S.B):
        S.layers(model)[0].output[:, -1] = 0
        after = S.layers(model)[1].output.save()
        logits = model.lm_head.output.save()
    return {"after": after, "logits": logits}


@program()
def edit_replace_by_assignment(model, S):
    with model.trace(S.A):
        h = S.layers(model)[1].output
        S.layers(model)[1].output = h * 2
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_replace_with_new_tensor(model, S):
    with model.trace(S.C):
        h = S.layers(model)[2].output
        S.layers(model)[2].output = torch.zeros_like(h) + 0.25
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_then_read_same_module(model, S):
    with model.trace(S.A):
        h = S.layers(model)[1].output
        h[:, 1] = 3.0
        seen = S.layers(model)[1].output.clone().save()
        logits = model.lm_head.output.save()
    return {"seen": seen, "logits": logits}


@program()
def edit_clone_before_edit(model, S):
    with model.trace(S.B):
        before = S.layers(model)[0].output.clone().save()
        S.layers(model)[0].output[:, :2] = 0
        after = S.layers(model)[0].output.clone().save()
        logits = model.lm_head.output.save()
    return {"before": before, "after": after, "logits": logits}


@program()
def edit_mlp_output_in_place(model, S):
    with model.trace(S.A):
        S.mlp(model, 1).output[:, -1] *= 0.5
        y = S.layers(model)[1].output.save()
    return {"y": y}


@program()
def edit_attention_tuple_element(model, S):
    with model.trace(S.C):
        S.attn(model, 0).output[0][:] = 0
        y = S.layers(model)[0].output.save()
        logits = model.lm_head.output.save()
    return {"y": y, "logits": logits}


@program()
def edit_attention_tuple_replaced(model, S):
    with model.trace(S.A):
        out = S.attn(model, 1).output
        S.attn(model, 1).output = (out[0] * -1.0, out[1])
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_block_input_in_place(model, S):
    with model.trace(S.B):
        S.layers(model)[2].input[:, -1] = 0
        y = S.layers(model)[2].output.save()
        logits = model.lm_head.output.save()
    return {"y": y, "logits": logits}


@program()
def edit_block_input_by_assignment(model, S):
    with model.trace(S.A):
        x = S.layers(model)[1].input
        S.layers(model)[1].input = x * 0.5
        y = S.layers(model)[1].output.save()
        logits = model.lm_head.output.save()
    return {"y": y, "logits": logits}


@program()
def edit_mlp_input(model, S):
    with model.trace(S.C):
        S.mlp(model, 0).input[:] = 1.0
        m = S.mlp(model, 0).output.save()
        logits = model.lm_head.output.save()
    return {"m": m, "logits": logits}


@program("gpt2", "llama", "ioi")
def edit_steering_vector_add(model, S):
    v = S.vec(1) * 4
    with model.trace(S.A):
        S.layers(model)[1].output[:, -1] += v
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_steering_all_positions_by_assignment(model, S):
    v = S.vec(2)
    with model.trace(S.B):
        S.layers(model)[0].output = S.layers(model)[0].output + 2 * v
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_steering_every_layer(model, S):
    v = S.vec(3) * 0.5
    with model.trace(S.C):
        for i in range(S.n):
            S.layers(model)[i].output[:] += v
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_ablate_all_mlps(model, S):
    with model.trace(S.A):
        for i in range(S.n):
            S.mlp(model, i).output = torch.zeros_like(S.mlp(model, i).output)
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program("gpt2", "llama", "ioi")
def edit_ablate_one_head(model, S):
    head = 1
    with model.trace(S.A):
        x = S.o_proj(model, 1).input
        x[:, :, head * S.head_dim:(head + 1) * S.head_dim] = 0
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_logits(model, S):
    with model.trace(S.B):
        model.lm_head.output[:, -1, S.ANS] = 100.0
        logits = model.output.logits.save()
    return {"logits": logits}


@program()
def edit_embeddings(model, S):
    with model.trace(S.A):
        S.embed(model).output[:] *= 3.0
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_final_norm(model, S):
    with model.trace(S.C):
        S.norm(model).output[:, :-1] = 0
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_in_place_method(model, S):
    with model.trace(S.A):
        S.layers(model)[1].output.mul_(0.5).add_(0.1)
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_clamp(model, S):
    with model.trace(S.B):
        h = S.layers(model)[0].output
        h[:] = h.clamp(-0.05, 0.05)
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_swap_positions(model, S):
    with model.trace(S.A):
        h = S.layers(model)[1].output
        h[:, [1, 2]] = h[:, [2, 1]]
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_mean_ablation(model, S):
    with model.trace(S.C):
        h = S.layers(model)[1].output
        h[:] = h.mean(dim=1, keepdim=True)
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_seeded_noise(model, S):
    noise = S.vec(4, 1, S.len(S.A), S.d) * 0.1
    with model.trace(S.A):
        S.embed(model).output[:] += noise
        logits = model.lm_head.output.save()
    return {"logits": logits}


NOISE_SUBJECT, NOISE_STD = [1, 2], 2.0  # test_inspect_oracle.py gives noise_patching the same


@program("gpt2", "llama", "ioi")
def edit_causal_trace_with_noise(model, S):
    """Causal tracing as ROME describes it, written out: seeded Gaussian noise on the input
    embeddings of the subject tokens, then each block's input at each position restored from the
    clean run, one trace per cell (what `nnpatch.noise_patching` computes as one sweep)."""
    noise = torch.zeros(S.len(S.A), S.d)
    draw = torch.randn(len(NOISE_SUBJECT), S.d, generator=torch.Generator().manual_seed(0))
    noise[NOISE_SUBJECT] = draw * NOISE_STD
    with model.trace(S.A):
        clean = []
        for i in range(S.n):
            clean.append(S.layers(model)[i].input.clone())
        clean = S.save(clean)
        clean_logits = model.lm_head.output[:, -1].save()
    with model.trace(S.A):
        S.embed(model).output[:] += noise
        noisy_logits = model.lm_head.output[:, -1].save()
    cells = {}
    for i in range(S.n):
        for pos in range(S.len(S.A)):
            with model.trace(S.A):
                S.embed(model).output[:] += noise
                S.layers(model)[i].input[:, pos] = clean[i][:, pos]
                cells[f"layer{i}_pos{pos}"] = model.lm_head.output[:, -1].save()
    return {"clean": clean_logits, "noisy": noisy_logits, **cells}


@program()
def edit_two_layers_and_read_between(model, S):
    with model.trace(S.B):
        S.layers(model)[0].output[:, 0] = 1.0
        middle = S.layers(model)[1].output.save()
        S.layers(model)[2].output[:, -1] = middle[:, -1]
        logits = model.lm_head.output.save()
    return {"middle": middle, "logits": logits}


@program()
def edit_one_token_prompt(model, S):
    with model.trace(S.ONE):
        S.layers(model)[0].output[:, -1] = S.vec(5)
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_row_of_prompt_list(model, S):
    with model.trace([S.A, S.B]):
        S.layers(model)[1].output[1] = 0
        logits = model.lm_head.output.save()
    return {"logits": logits}


# =================================================================================================
# 3. Several invokes, no variable shared between them
# =================================================================================================

@program()
def invokes_independent_reads(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            ha = S.layers(model)[1].output.save()
        with tracer.invoke(S.B):
            hb = S.layers(model)[2].output.save()
    return {"ha": ha, "hb": hb}


@program("gpt2", "llama", "ioi")
def invokes_three_reads(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            la = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.B):
            lb = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.C):
            lc = model.lm_head.output[:, -1].save()
    return {"la": la, "lb": lb, "lc": lc}


@program()
def invokes_edit_does_not_leak(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            S.layers(model)[0].output[:] = 0
            la = model.lm_head.output.save()
        with tracer.invoke(S.B):
            lb = model.lm_head.output.save()
    return {"la": la, "lb": lb}


@program("gpt2", "llama", "ioi")
def invokes_equal_prompts_one_edited(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            S.layers(model)[1].output[:, -1] = 0
            edited = model.lm_head.output.save()
        with tracer.invoke(S.A):
            plain = model.lm_head.output.save()
    return {"edited": edited, "plain": plain}


@program("gpt2", "llama", "ioi")
def invokes_different_lengths_negative_index(model, S):
    n = S.len(S.SHORT)
    with model.trace() as tracer:
        with tracer.invoke(S.SHORT):
            short_h = S.layers(model)[1].output[:, -n:].save()
            short_last = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.A):
            long_h = S.layers(model)[1].output.save()
    return {"short_h": short_h, "short_last": short_last, "long_h": long_h}


@program()
def invokes_padded_edit_last_position(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            la = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.SHORT):
            S.layers(model)[0].output[:, -1] = 0
            ls = model.lm_head.output[:, -1].save()
    return {"la": la, "ls": ls}


@program("gpt2", "llama", "ioi")
def invokes_one_token_next_to_long(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.ONE):
            h_one = S.layers(model)[2].output[:, -1].save()
            one = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.LONG):
            long = model.lm_head.output[:, -1].save()
    return {"one": one, "h_one": h_one, "long": long}


@program()
def invokes_prompt_list_and_single(model, S):
    with model.trace() as tracer:
        with tracer.invoke([S.A, S.B]):
            pair = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.C):
            single = model.lm_head.output[:, -1].save()
    return {"pair": pair, "single": single}


@program()
def invokes_in_a_loop(model, S):
    outs = []
    with model.trace() as tracer:
        for text in (S.A, S.B, S.C):
            with tracer.invoke(text):
                outs.append(model.lm_head.output[:, -1].save())
    return {f"out{i}": t for i, t in enumerate(outs)}


@program()
def invokes_padded_steering(model, S):
    v = S.vec(6)
    with model.trace() as tracer:
        with tracer.invoke(S.LONG):
            S.layers(model)[1].output[:, -1] += v
            l_long = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.SHORT):
            S.layers(model)[1].output[:, -1] += v
            l_short = model.lm_head.output[:, -1].save()
    return {"l_long": l_long, "l_short": l_short}


@program()
def invokes_empty_middle(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            la = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.SHORT):
            pass
        with tracer.invoke(S.C):
            lc = model.lm_head.output[:, -1].save()
    return {"la": la, "lc": lc}


# =================================================================================================
# 4. Activation patching with barriers (nnsight's way)
# =================================================================================================

@program("gpt2", "llama", "ioi")
def patch_block_output_with_barrier(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            clean = S.layers(model)[1].output
            barrier()
        with tracer.invoke(S.B):
            barrier()
            S.layers(model)[1].output = clean
            patched = model.lm_head.output.save()
    return {"patched": patched}


@program("gpt2", "llama", "ioi")
def patch_last_position_with_barrier(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            clean = S.layers(model)[2].input[:, -1]
            barrier()
        with tracer.invoke(S.B):
            barrier()
            S.layers(model)[2].input[:, -1] = clean
            patched = model.lm_head.output[:, -1].save()
    return {"patched": patched}


@program()
def patch_attention_output_with_barrier(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            clean = S.attn(model, 1).output[0][:, -1]
            barrier()
        with tracer.invoke(S.C):
            barrier()
            S.attn(model, 1).output[0][:, -1] = clean
            patched = model.lm_head.output.save()
    return {"patched": patched}


@program()
def patch_mlp_output_with_barrier(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.B):
            clean = S.mlp(model, 0).output
            barrier()
        with tracer.invoke(S.A):
            barrier()
            S.mlp(model, 0).output[:] = clean
            h = S.layers(model)[0].output.save()
            patched = model.lm_head.output.save()
    return {"h": h, "patched": patched}


@program()
def patch_head_with_barrier(model, S):
    lo, hi = 2 * S.head_dim, 3 * S.head_dim
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            clean = S.o_proj(model, 0).input[:, :, lo:hi]
            barrier()
        with tracer.invoke(S.B):
            barrier()
            S.o_proj(model, 0).input[:, :, lo:hi] = clean
            patched = model.lm_head.output.save()
    return {"patched": patched}


@program("gpt2", "llama", "ioi")
def patch_three_invokes_one_source(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(3)
        with tracer.invoke(S.A):
            clean = S.layers(model)[0].output[:, -1]
            barrier()
        with tracer.invoke(S.B):
            barrier()
            S.layers(model)[0].output[:, -1] = clean
            pb = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.C):
            barrier()
            S.layers(model)[0].output[:, -1] = clean * 0.5
            pc = model.lm_head.output[:, -1].save()
    return {"pb": pb, "pc": pc}


@program()
def patch_two_sources_into_third(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(3)
        with tracer.invoke(S.A):
            xa = S.layers(model)[1].output[:, -1]
            barrier()
        with tracer.invoke(S.B):
            xb = S.layers(model)[1].output[:, -1]
            barrier()
        with tracer.invoke(S.C):
            barrier()
            S.layers(model)[1].output[:, -1] = (xa + xb) / 2
            pc = model.lm_head.output.save()
    return {"pc": pc}


@program("gpt2", "llama", "ioi")
def patch_padded_source_into_long_target(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.SHORT):
            src = S.layers(model)[1].output[:, -1]
            barrier()
        with tracer.invoke(S.A):
            barrier()
            S.layers(model)[1].output[:, -1] = src
            patched = model.lm_head.output[:, -1].save()
    return {"patched": patched}


@program()
def patch_long_source_into_padded_target(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.LONG):
            src = S.layers(model)[0].output[:, -2:]
            barrier()
        with tracer.invoke(S.SHORT):
            barrier()
            S.layers(model)[0].output[:, -2:] = src
            patched = model.lm_head.output[:, -1].save()
    return {"patched": patched}


@program()
def patch_every_layer_in_a_loop_with_barriers(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            src = []
            for i in range(S.n):
                src.append(S.layers(model)[i].output[:, -1])
                barrier()
        with tracer.invoke(S.B):
            for i in range(S.n):
                barrier()
                S.layers(model)[i].output[:, -1] = 0.5 * src[i] + 0.5 * S.layers(model)[i].output[:, -1]
            patched = model.lm_head.output.save()
    return {"patched": patched}


@program("gpt2", "llama", "ioi")
def patch_equal_prompts_is_identity(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            clean = S.layers(model)[1].output
            barrier()
            reference = model.lm_head.output.save()
        with tracer.invoke(S.A):
            barrier()
            S.layers(model)[1].output = clean
            patched = model.lm_head.output.save()
    return {"reference": reference, "patched": patched}


@program()
def patch_interpolation_with_barrier(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.C):
            clean = S.layers(model)[2].output
            barrier()
        with tracer.invoke(S.B):
            barrier()
            h = S.layers(model)[2].output
            S.layers(model)[2].output = 0.25 * clean + 0.75 * h
            patched = model.lm_head.output.save()
    return {"patched": patched}


@program()
def patch_then_read_later_layers(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            clean = S.layers(model)[0].output[:, 2:]
            barrier()
        with tracer.invoke(S.B):
            barrier()
            S.layers(model)[0].output[:, 2:] = clean
            h1 = S.layers(model)[1].output.save()
            h2 = S.layers(model)[2].output.save()
    return {"h1": h1, "h2": h2}


@program()
def patch_source_also_edited(model, S):
    # the source invoke edits layer 0 and hands its (edited) layer-1 output over
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            S.layers(model)[0].output[:, 0] = 0
            src = S.layers(model)[1].output[:, -1]
            barrier()
        with tracer.invoke(S.B):
            barrier()
            S.layers(model)[1].output[:, -1] = src
            patched = model.lm_head.output.save()
    return {"patched": patched}


@program()
def patch_via_helper_with_barrier(model, S):
    def copy_last(envoy, value):
        envoy.output[:, -1] = value

    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.C):
            src = S.layers(model)[1].output[:, -1]
            barrier()
        with tracer.invoke(S.A):
            barrier()
            copy_last(S.layers(model)[1], src)
            patched = model.lm_head.output.save()
    return {"patched": patched}


@program()
def patch_one_token_source(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.ONE):
            src = S.layers(model)[1].output[:, -1]
            barrier()
        with tracer.invoke(S.B):
            barrier()
            S.layers(model)[1].output[:, -1] = src
            patched = model.lm_head.output[:, -1].save()
    return {"patched": patched}


# =================================================================================================
# 5. Control flow and helper functions
# =================================================================================================

@program()
def flow_condition_on_value(model, S):
    with model.trace(S.A):
        h = S.layers(model)[0].output
        if h[0, -1].sum() > 0:
            S.layers(model)[1].output[:] = 0
        else:
            S.layers(model)[1].output[:] = 1
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def flow_condition_per_invoke(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            if S.layers(model)[0].output.mean() > 0:
                S.layers(model)[2].output[:] *= 2
            la = model.lm_head.output.save()
        with tracer.invoke(S.B):
            if S.layers(model)[0].output.mean() <= 0:
                S.layers(model)[2].output[:] *= 2
            lb = model.lm_head.output.save()
    return {"la": la, "lb": lb}


@program()
def flow_loop_over_layers(model, S):
    with model.trace(S.B):
        norms = []
        for i in range(S.n):
            norms.append(S.layers(model)[i].output.norm(dim=-1))
        norms = S.save(norms)
        stack = torch.stack(norms).save()
    return {"stack": stack}


@program()
def flow_loop_edit_every_other_layer(model, S):
    with model.trace(S.A):
        for i in range(S.n):
            if i % 2 == 0:
                S.layers(model)[i].output[:, -1] = 0
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def flow_while_loop(model, S):
    with model.trace(S.C):
        i = 0
        total = torch.zeros(())
        while i < S.n:
            total = total + S.layers(model)[i].output[0, -1].abs().sum()
            i += 1
        total = total.save()
    return {"total": total}


@program()
def flow_break_out_of_loop(model, S):
    with model.trace(S.A):
        seen = []
        for i in range(S.n):
            seen.append(S.layers(model)[i].output[0, -1, :4])
            if i == 1:
                break
        seen = S.save(seen)
        logits = model.lm_head.output.save()
    return {"seen0": seen[0], "seen1": seen[1], "logits": logits}


@program()
def flow_list_comprehension(model, S):
    with model.trace(S.B):
        hs = S.save([S.layers(model)[i].output[0, -1] for i in range(S.n)])
    return {f"h{i}": t for i, t in enumerate(hs)}


@program()
def flow_dict_of_results(model, S):
    with model.trace(S.A):
        out = {}
        for i in range(S.n):
            out[f"layer{i}"] = S.mlp(model, i).output[:, -1]
        out = S.save(out)
    return out


@program()
def flow_nested_function_in_body(model, S):
    with model.trace(S.C):
        def last(i):
            return S.layers(model)[i].output[:, -1]
        a = last(0).save()
        b = last(2).save()
    return {"a": a, "b": b}


@program()
def flow_lambda_in_body(model, S):
    with model.trace(S.A):
        at = lambda i: S.mlp(model, i).output[0]  # noqa: E731
        x = at(1).save()
    return {"x": x}


def _read_last(model, S, i):
    return S.layers(model)[i].output[:, -1]


def _zero_position(model, S, i, pos):
    S.layers(model)[i].output[:, pos] = 0


def _logit_diff(model, S):
    logits = model.lm_head.output
    return logits[:, -1, S.ANS] - logits[:, -1, S.WRONG]


def _read_and_save(model, S, i):
    return S.layers(model)[i].output.save()


@program("gpt2", "llama", "ioi")
def helper_reads(model, S):
    with model.trace(S.A):
        a = _read_last(model, S, 0).save()
        b = _read_last(model, S, 2).save()
    return {"a": a, "b": b}


@program()
def helper_edits(model, S):
    with model.trace(S.B):
        _zero_position(model, S, 1, 0)
        _zero_position(model, S, 2, -1)
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program("gpt2", "llama", "ioi")
def helper_metric(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            da = _logit_diff(model, S).save()
        with tracer.invoke(S.B):
            db = _logit_diff(model, S).save()
    return {"da": da, "db": db}


@program(xfail="nnpatch rewrites `.save()` only in the trace body's own source, so `.save()` in a helper "
               "function called from the body fails: AttributeError 'Tensor' object has no attribute "
               "'save' (nnsight accepts it anywhere during a trace)")
def helper_saves_inside(model, S):
    with model.trace(S.C):
        h = _read_and_save(model, S, 1)
    return {"h": h}


@program()
def helper_loop_of_traces(model, S):
    out = {}
    for name in ("A", "B"):
        with model.trace(getattr(S, name)):
            logits = model.lm_head.output[:, -1].save()
        out[name] = logits
    return out


# =================================================================================================
# 6. Gradients, read inside `with loss.backward():` in reverse order (nnsight's way)
# =================================================================================================

@program("gpt2", "llama", "ioi")
def grad_of_block_output(model, S):
    with model.trace(S.A):
        h = S.layers(model)[1].output
        logits = model.lm_head.output
        with metric(logits, S).backward():
            g = h.grad.save()
    return {"g": g}


@program("gpt2", "llama", "ioi")
def grad_of_layers_reverse_order(model, S):
    with model.trace(S.B):
        h0 = S.layers(model)[0].output
        h1 = S.layers(model)[1].output
        h2 = S.layers(model)[2].output
        logits = model.lm_head.output
        with metric(logits, S).backward():
            g2 = h2.grad.save()
            g1 = h1.grad.save()
            g0 = h0.grad.save()
    return {"g0": g0, "g1": g1, "g2": g2}


@program()
def grad_of_attention_tuple_element(model, S):
    with model.trace(S.C):
        a = S.attn(model, 1).output[0]
        logits = model.lm_head.output
        with metric(logits, S).backward():
            g = a.grad.save()
    return {"g": g}


@program()
def grad_of_mlp_output(model, S):
    with model.trace(S.A):
        m = S.mlp(model, 0).output
        logits = model.lm_head.output
        with logits[0, -1].logsumexp(-1).backward():
            g = m.grad.save()
    return {"g": g}


@program()
def grad_of_block_input(model, S):
    with model.trace(S.B):
        x = S.layers(model)[1].input
        logits = model.lm_head.output
        with metric(logits, S).backward():
            g = x.grad.save()
    return {"g": g}


@program()
def grad_of_embeddings(model, S):
    with model.trace(S.A):
        e = S.embed(model).output
        logits = model.lm_head.output
        with logits[0, -1, S.ANS].backward():
            g = e.grad.save()
    return {"g": g}


@program()
def grad_edit_then_read_earlier(model, S):
    with model.trace(S.C):
        h0 = S.layers(model)[0].output
        h2 = S.layers(model)[2].output
        logits = model.lm_head.output
        with metric(logits, S).backward():
            h2.grad = h2.grad * 3.0 - 0.5
            g0 = h0.grad.save()
    return {"g0": g0}


@program()
def grad_zero_a_gradient(model, S):
    with model.trace(S.A):
        h0 = S.layers(model)[0].output
        h1 = S.layers(model)[1].output
        logits = model.lm_head.output
        with metric(logits, S).backward():
            g1 = h1.grad.clone().save()
            h1.grad[:] = 0
            g0 = h0.grad.save()
    return {"g1": g1, "g0": g0}


@program()
def grad_after_forward_edit(model, S):
    with model.trace(S.B):
        S.layers(model)[0].output[:, -1] = 0
        h = S.layers(model)[1].output
        logits = model.lm_head.output
        with metric(logits, S).backward():
            g = h.grad.save()
        logits = logits.save()
    return {"g": g, "logits": logits}


@program()
def grad_two_invokes_each_backward(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            ha = S.layers(model)[1].output
            la = model.lm_head.output
            with metric(la, S).backward(retain_graph=True):
                ga = ha.grad.save()
        with tracer.invoke(S.C):
            hc = S.layers(model)[1].output
            lc = model.lm_head.output
            with metric(lc, S).backward():
                gc = hc.grad.save()
    return {"ga": ga, "gc": gc}


@program("gpt2", "llama", "ioi")
def grad_padded_invoke(model, S):
    n = S.len(S.SHORT)
    with model.trace() as tracer:
        with tracer.invoke(S.SHORT):
            h = S.layers(model)[1].output
            logits = model.lm_head.output
            with metric(logits, S).backward(retain_graph=True):
                g = h.grad[:, -n:].save()
        with tracer.invoke(S.A):
            other = model.lm_head.output[:, -1].save()
    return {"g": g, "other": other}


@program()
def grad_attribution_with_barrier(model, S):
    # attribution patching in one trace: (clean - corrupt) * grad at layer 1
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            clean = S.layers(model)[1].output
            barrier()
        with tracer.invoke(S.B):
            barrier()
            corrupt = S.layers(model)[1].output
            logits = model.lm_head.output
            with metric(logits, S).backward():
                attribution = ((clean - corrupt) * corrupt.grad).sum(-1).save()
    return {"attribution": attribution}


@program()
def grad_sum_of_logits(model, S):
    with model.trace(S.A):
        n = S.norm(model).output
        logits = model.lm_head.output
        with logits.sum().backward():
            g = n.grad.save()
    return {"g": g}


@program(xfail="nnpatch rewrites .backward() and .grad only in the trace body's own source: `with "
               "loss.backward():` inside a helper function runs torch's real backward, which returns "
               "None (TypeError 'NoneType' object does not support the context manager protocol; at "
               "f8ce1ff, where gradients were recorded only when the body's source mentions them, "
               "RuntimeError 'element 0 of tensors does not require grad'); nnsight runs it")
def grad_in_a_helper(model, S):
    def backward_and_grab(loss, h):
        with loss.backward():
            g = h.grad.save()
        return g

    with model.trace(S.B):
        h = S.layers(model)[2].output
        logits = model.lm_head.output
        g = backward_and_grab(metric(logits, S), h)
    return {"g": g}


# =================================================================================================
# 7. Attention weights (eager attention) and shape coincidences
# =================================================================================================

@program("gpt2e", "llamae")
def attn_weights_read(model, S):
    with model.trace(S.A):
        w0 = S.attn(model, 0).output[1].save()
        w2 = S.attn(model, 2).output[1][:, :, -1].save()
    return {"w0": w0, "w2": w2}


@program("gpt2e", "llamae")
def attn_weights_output_attentions(model, S):
    with model.trace(S.B, output_attentions=True):
        attentions = S.save(model.output.attentions)
        first = attentions[0].save()
    return {"first": first}


@program("gpt2e", "llamae")
def attn_weights_edit(model, S):
    with model.trace(S.C):
        w = S.attn(model, 1).output[1]
        w2 = S.attn(model, 1).output[0]
        logits = model.lm_head.output.save()
        w = w.save()
        w2 = w2.save()
    return {"w": w, "w2": w2, "logits": logits}


@program("gpt2e", "llamae")
def attn_weights_padded_invoke(model, S):
    # 6 and 3 tokens, 4 heads: the short invoke's weights, last 3 x 3 block
    n = S.len(S.SHORT)
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            wa = S.attn(model, 0).output[1].save()
        with tracer.invoke(S.SHORT):
            ws = S.attn(model, 0).output[1][:, :, -n:, -n:].save()
    return {"wa": wa, "ws": ws}


@program("gpt2e", "llamae")
def attn_weights_heads_equal_tokens_padded(model, S):
    # FOUR has 4 tokens and the models have 4 heads; PAIR is left-padded by 2
    with model.trace() as tracer:
        with tracer.invoke(S.FOUR):
            w4 = S.attn(model, 1).output[1].save()
        with tracer.invoke(S.PAIR):
            w2 = S.attn(model, 1).output[1][:, :, -2:, -2:].save()
            l2 = model.lm_head.output[:, -1].save()
    return {"w4": w4, "w2": w2, "l2": l2}


@program("gpt2e", "llamae")
def attn_weights_heads_equal_tokens_unpadded(model, S):
    with model.trace(S.FOUR):
        w = S.attn(model, 0).output[1].save()
        per_head = w.sum(-1).save()
    return {"w": w, "per_head": per_head}


@program("gpt2e", "llamae")
def attn_head_patch_with_barrier_heads_equal_tokens(model, S):
    lo, hi = 0, S.head_dim
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.FOUR):
            src = S.o_proj(model, 1).input[:, :, lo:hi]
            barrier()
        with tracer.invoke(S.FOUR2):
            barrier()
            S.o_proj(model, 1).input[:, :, lo:hi] = src
            patched = model.lm_head.output.save()
    return {"patched": patched}


@program("gpt2d8", "llamad8")
def coincidence_d_model_equals_tokens(model, S):
    # d_model 8 and an 8-token prompt: (1, 8, 8) hidden states
    with model.trace(S.EIGHT):
        h = S.layers(model)[1].output.save()
        S.layers(model)[1].output[:, -1] = 0
        logits = model.lm_head.output.save()
    return {"h": h, "logits": logits}


@program("gpt2d8", "llamad8")
def coincidence_d_model_equals_tokens_padded(model, S):
    n = S.len(S.SHORT)
    with model.trace() as tracer:
        with tracer.invoke(S.EIGHT):
            h8 = S.layers(model)[0].output.save()
        with tracer.invoke(S.SHORT):
            hs = S.layers(model)[0].output[:, -n:].save()
            S.layers(model)[0].output[:, -1] = 0
            ls = model.lm_head.output[:, -1].save()
    return {"h8": h8, "hs": hs, "ls": ls}


@program("gpt2d8", "llamad8")
def coincidence_d_model_equals_tokens_grad(model, S):
    with model.trace(S.EIGHT):
        h = S.layers(model)[0].output
        logits = model.lm_head.output
        with metric(logits, S).backward():
            g = h.grad.save()
    return {"g": g}


@program()
def coincidence_batch_equals_tokens(model, S):
    # three prompts of three tokens in one invoke: (3, 3, d)
    with model.trace([S.SHORT, S.SHORT2, S.SHORT3]):
        h = S.layers(model)[1].output.save()
        S.layers(model)[1].output[:, -1] = 0
        logits = model.lm_head.output.save()
    return {"h": h, "logits": logits}


@program()
def coincidence_batch_equals_tokens_two_invokes(model, S):
    with model.trace() as tracer:
        with tracer.invoke([S.SHORT, S.SHORT2]):
            pair = S.layers(model)[2].output.save()
        with tracer.invoke(S.SHORT3):
            single = S.layers(model)[2].output.save()
    return {"pair": pair, "single": single}


@program()
def coincidence_batch_equals_tokens_padded(model, S):
    # batch 3 next to a 3-token longest prompt, with a 1-token row padded inside the invoke
    with model.trace() as tracer:
        with tracer.invoke([S.SHORT, S.ONE]):
            h = S.layers(model)[1].output.save()
        with tracer.invoke(S.SHORT2):
            last = model.lm_head.output[:, -1].save()
    return {"h": h, "last": last}


@program("gpt2e", "llamae")
def coincidence_batch_heads_tokens_all_four(model, S):
    with model.trace([S.FOUR, S.FOUR2, S.FOUR, S.FOUR2]):
        w = S.attn(model, 2).output[1].save()
        h = S.layers(model)[2].output.save()
    return {"w": w, "h": h}


# =================================================================================================
# 8. Programs nnsight rejects but nnpatch supports by design: plain-PyTorch references
# =================================================================================================

def ref_patch_without_barrier(hf, S):
    _, clean = layer_outputs(hf, S, S.A)
    logits, _ = layer_outputs(hf, S, S.B, {1: lambda t: clean[1]})
    return {"patched": logits}


@program("gpt2", "llama", "ioi", ref=ref_patch_without_barrier, nnsight_raises=NameError)
def nobarrier_patch_producer_first(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            clean = S.layers(model)[1].output
        with tracer.invoke(S.B):
            S.layers(model)[1].output = clean
            patched = model.lm_head.output.save()
    return {"patched": patched}


@program("gpt2", "llama", "ioi", ref=ref_patch_without_barrier, nnsight_raises=NameError)
def nobarrier_patch_consumer_first(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.B):
            S.layers(model)[1].output = clean  # noqa: F821 - assigned by the next invoke
            patched = model.lm_head.output.save()
        with tracer.invoke(S.A):
            clean = S.layers(model)[1].output
    return {"patched": patched}


def ref_patch_last_position(hf, S, src=None, dst=None, layer=2):
    src, dst = src or S.A, dst or S.B
    _, clean = layer_outputs(hf, S, src)

    def put(t):
        t[:, -1] = clean[layer][:, -1]
    logits, _ = layer_outputs(hf, S, dst, {layer: put})
    return {"patched": logits[:, -1]}


@program(ref=ref_patch_last_position, nnsight_raises=NameError)
def nobarrier_patch_last_position_consumer_first(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.B):
            S.layers(model)[2].output[:, -1] = src  # noqa: F821
            patched = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.A):
            src = S.layers(model)[2].output[:, -1]
    return {"patched": patched}


def ref_padded_consumer_first(hf, S):
    return ref_patch_last_position(hf, S, src=S.A, dst=S.SHORT, layer=1)


@program("gpt2", "llama", "ioi", ref=ref_padded_consumer_first, nnsight_raises=NameError)
def nobarrier_padded_consumer_first(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.SHORT):
            S.layers(model)[1].output[:, -1] = src  # noqa: F821
            patched = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.A):
            src = S.layers(model)[1].output[:, -1]
    return {"patched": patched}


def ref_chain(hf, S):
    _, a = layer_outputs(hf, S, S.A)
    _, b = layer_outputs(hf, S, S.B, {0: lambda t: a[0]})
    logits, _ = layer_outputs(hf, S, S.C, {2: lambda t: b[2]})
    return {"c_logits": logits}


@program(ref=ref_chain, nnsight_raises=NameError)
def nobarrier_chain_over_three_invokes(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.C):
            S.layers(model)[2].output = from_b  # noqa: F821
            c_logits = model.lm_head.output.save()
        with tracer.invoke(S.B):
            S.layers(model)[0].output = from_a  # noqa: F821
            from_b = S.layers(model)[2].output
        with tracer.invoke(S.A):
            from_a = S.layers(model)[0].output
    return {"c_logits": c_logits}


def ref_late_into_early(hf, S):
    _, a = layer_outputs(hf, S, S.A)

    def put(t):
        t[:, -1] = a[S.n - 1][:, -1]
    logits, _ = layer_outputs(hf, S, S.B, {0: put})
    return {"scoped": logits}


@program("gpt2", "llama", "ioi", ref=ref_late_into_early, nnsight_raises=NameError)
def nobarrier_late_layer_into_early_layer(model, S):
    # Patchscopes-style: B needs at layer 0 what A computes at the last layer
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            late = S.layers(model)[S.n - 1].output[:, -1]
        with tracer.invoke(S.B):
            S.layers(model)[0].output[:, -1] = late
            scoped = model.lm_head.output.save()
    return {"scoped": scoped}


def ref_trace_level(hf, S):
    la = fwd(hf, S.ids(S.A))[0, -1]
    lb = fwd(hf, S.ids(S.B))[0, -1]
    return {"diff": la - lb, "best": la.argmax()}


@program("gpt2", "llama", "ioi", ref=ref_trace_level, nnsight_raises=NameError)
def nobarrier_trace_level_code_after_invokes(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            la = model.lm_head.output[0, -1].save()
        with tracer.invoke(S.B):
            lb = model.lm_head.output[0, -1].save()
        diff = (la - lb).save()
        best = la.argmax().save()
    return {"diff": diff, "best": best}


def ref_three_targets(hf, S):
    _, a = layer_outputs(hf, S, S.A)
    out = {}
    for name, text in (("pb", S.B), ("pc", S.C)):
        def put(t):
            t[:, -1] = a[0][:, -1]
        out[name] = layer_outputs(hf, S, text, {0: put})[0][:, -1]
    return out


@program(ref=ref_three_targets, nnsight_raises=NameError)
def nobarrier_one_source_two_targets_around_it(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.B):
            S.layers(model)[0].output[:, -1] = src  # noqa: F821
            pb = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.A):
            src = S.layers(model)[0].output[:, -1]
        with tracer.invoke(S.C):
            S.layers(model)[0].output[:, -1] = src
            pc = model.lm_head.output[:, -1].save()
    return {"pb": pb, "pc": pc}


def ref_sweep(hf, S):
    _, clean = layer_outputs(hf, S, S.A)
    out = {}
    for layer in range(S.n):
        def put(t, layer=layer):
            t[:, -1] = clean[layer][:, -1]
        out[f"layer{layer}"] = metric(layer_outputs(hf, S, S.B, {layer: put})[0], S)
    return out


@program("gpt2", "llama", "ioi", ref=ref_sweep, nnsight_raises=NameError)
def nobarrier_layer_sweep_in_invoke_loop(model, S):
    results = {}
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            clean = [S.layers(model)[i].output[:, -1] for i in range(S.n)]
        for layer in range(S.n):
            with tracer.invoke(S.B):
                S.layers(model)[layer].output[:, -1] = clean[layer]
                results[f"layer{layer}"] = metric(model.lm_head.output, S).save()
    return results


def ref_of_invoke(hf, S):
    _, clean = layer_outputs(hf, S, S.A)

    def put(t):
        t[:, -1] = clean[1][:, -1]
    return {"patched": layer_outputs(hf, S, S.C, {1: put})[0]}


@program(ref=ref_of_invoke)
def nnpatch_model_of_invoke(model, S):
    # nnpatch's own API (no nnsight spelling): another invoke's rows by module path
    with model.trace() as tracer:
        with tracer.invoke(S.C):
            S.layers(model)[1].output[:, -1] = S.layers(model.of(clean_run))[1].output[:, -1]
            patched = model.lm_head.output.save()
        with tracer.invoke(S.A) as clean_run:
            pass
    return {"patched": patched}


def ref_layer_grads(hf, S, text=None, layers=(0, 1, 2)):
    text = text or S.B
    sites = {i: (S.layers(hf)[i], "output") for i in layers}
    _, grads, _ = autograd_of(hf, S, text, sites)
    return {f"g{i}": grads[i] for i in layers}


@program("gpt2", "llama", "ioi", ref=ref_layer_grads, nnsight_raises="OutOfOrderError")
def anyorder_grads_forward_order(model, S):
    with model.trace(S.B):
        h0 = S.layers(model)[0].output
        h1 = S.layers(model)[1].output
        h2 = S.layers(model)[2].output
        logits = model.lm_head.output
        with metric(logits, S).backward():
            g0 = h0.grad.save()
            g1 = h1.grad.save()
            g2 = h2.grad.save()
    return {"g0": g0, "g1": g1, "g2": g2}


@program(ref=ref_layer_grads, nnsight_raises="OutOfOrderError")
def anyorder_grads_shuffled_order(model, S):
    with model.trace(S.B):
        h0 = S.layers(model)[0].output
        h1 = S.layers(model)[1].output
        h2 = S.layers(model)[2].output
        logits = model.lm_head.output
        with metric(logits, S).backward():
            g1 = h1.grad.save()
            g0 = h0.grad.save()
            g2 = h2.grad.save()
    return {"g0": g0, "g1": g1, "g2": g2}


def ref_grads_after_backward(hf, S):
    return ref_layer_grads(hf, S, S.A, [0, 2])


@program(ref=ref_grads_after_backward, nnsight_raises=GIVES_NONE)
def anyorder_grads_read_after_with_block(model, S):
    with model.trace(S.A):
        h0 = S.layers(model)[0].output
        h2 = S.layers(model)[2].output
        logits = model.lm_head.output
        with metric(logits, S).backward():
            pass
        g0 = h0.grad.save()
        g2 = h2.grad.save()
    return {"g0": g0, "g2": g2}


@program(ref=ref_grads_after_backward, nnsight_raises=GIVES_NONE)
def anyorder_plain_backward_call(model, S):
    with model.trace(S.A):
        h0 = S.layers(model)[0].output
        h2 = S.layers(model)[2].output
        logits = model.lm_head.output
        metric(logits, S).backward()
        g0 = h0.grad.save()
        g2 = h2.grad.save()
    return {"g0": g0, "g2": g2}


def ref_slice_grads(hf, S):
    grads = ref_layer_grads(hf, S, S.C, [1])
    return {"window": grads["g1"][:, 2:4], "last": grads["g1"][0, -1]}


@program(ref=ref_slice_grads, nnsight_raises="OutOfOrderError")
def anyorder_grads_of_slices(model, S):
    with model.trace(S.C):
        h = S.layers(model)[1].output
        window = h[:, 2:4]
        last = h[0, -1]
        with metric(model.lm_head.output, S).backward():
            window_g = window.grad.save()
            last_g = last.grad.save()
    return {"window": window_g, "last": last_g}


def ref_grad_edit_forward_order(hf, S):
    sites = {0: (S.layers(hf)[0], "output"), 2: (S.layers(hf)[2], "output")}
    _, plain, _ = autograd_of(hf, S, S.C, sites)
    # a retained gradient is stored after the tensor's own hooks ran: grads[2] is the edited one
    _, edited, _ = autograd_of(hf, S, S.C, sites, grad_edits={2: lambda g: g * 3.0 - 0.5})
    return {"before": plain[0], "after": edited[0], "g2": edited[2]}


@program(ref=ref_grad_edit_forward_order, nnsight_raises="OutOfOrderError")
def anyorder_grad_edit_read_in_forward_order(model, S):
    # read the earlier layer's gradient first, then edit the later one and read again
    with model.trace(S.C):
        h0 = S.layers(model)[0].output
        h2 = S.layers(model)[2].output
        with metric(model.lm_head.output, S).backward():
            before = h0.grad.clone().save()
            h2.grad = h2.grad * 3.0 - 0.5
            after = h0.grad.save()
            g2 = h2.grad.save()
    return {"before": before, "after": after, "g2": g2}


def ref_multi_invoke_grads(hf, S):
    s = ref_layer_grads(hf, S, S.SHORT, [1])
    a = ref_layer_grads(hf, S, S.A, [0, 2])
    return {"s": s["g1"], "a0": a["g0"], "a2": a["g2"]}


@program("gpt2", "llama", "ioi", ref=ref_multi_invoke_grads, nnsight_raises=RuntimeError)
def anyorder_grads_two_padded_invokes(model, S):
    # nnpatch's view of the short invoke has its own 3 positions (no padding)
    with model.trace() as tracer:
        with tracer.invoke(S.SHORT):
            s_mid = S.layers(model)[1].output
            with metric(model.lm_head.output, S).backward():
                s_grad = s_mid.grad.save()
        with tracer.invoke(S.A):
            a0 = S.layers(model)[0].output
            a2 = S.layers(model)[2].output
            with metric(model.lm_head.output, S).backward():
                g0 = a0.grad.save()
                g2 = a2.grad.save()
    return {"s": s_grad, "a0": g0, "a2": g2}


def ref_input_and_output_grads(hf, S):
    sites = {"x1": (S.layers(hf)[1], "input"), "m1": (S.mlp(hf, 1), "output"),
             "h2": (S.layers(hf)[2], "output")}
    _, grads, _ = autograd_of(hf, S, S.A, sites)
    return grads


@program(ref=ref_input_and_output_grads, nnsight_raises="OutOfOrderError")
def anyorder_grads_of_inputs_and_outputs(model, S):
    with model.trace(S.A):
        x1 = S.layers(model)[1].input
        m1 = S.mlp(model, 1).output
        h2 = S.layers(model)[2].output
        with metric(model.lm_head.output, S).backward():
            gx = x1.grad.save()
            gm = m1.grad.save()
            gh = h2.grad.save()
    return {"x1": gx, "m1": gm, "h2": gh}


@program("gpt2", "llama", "ioi")
def grad_attribution_consumer_first_without_barrier(model, S):
    # nnsight runs this one: the backward block runs after the whole forward pass
    with model.trace() as tracer:
        with tracer.invoke(S.B):
            corrupt = S.layers(model)[1].output
            with metric(model.lm_head.output, S).backward():
                attribution = ((clean - corrupt) * corrupt.grad).sum(-1).save()  # noqa: F821
        with tracer.invoke(S.A):
            clean = S.layers(model)[1].output
    return {"attribution": attribution}


def ref_positive_index_padded(hf, S):
    _, seen = layer_outputs(hf, S, S.SHORT)
    logits, _ = layer_outputs(hf, S, S.SHORT, {0: lambda t: t.index_fill_(1, torch.tensor([0]), 0.0)})
    return {"first": seen[1][:, 0], "logits": logits[:, -1]}


@program(ref=ref_positive_index_padded)
def padding_positive_index_is_own_token(model, S):
    # nnpatch: position 0 of a left-padded invoke is its own first token (nnsight: a pad)
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            pass
        with tracer.invoke(S.SHORT):
            S.layers(model)[0].output[:, 0] = 0
            logits = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.SHORT):
            first = S.layers(model)[1].output[:, 0].save()
    return {"first": first, "logits": logits}


def ref_padded_full_view(hf, S):
    logits, seen = layer_outputs(hf, S, S.SHORT)
    return {"h": seen[2], "logits": logits}


@program("gpt2", "llama", "ioi", ref=ref_padded_full_view)
def padding_invoke_sees_only_its_tokens(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.LONG):
            pass
        with tracer.invoke(S.SHORT):
            h = S.layers(model)[2].output.save()
            logits = model.lm_head.output.save()
    return {"h": h, "logits": logits}


# =================================================================================================
# 9. More invokes, patching and helpers
# =================================================================================================

@program("gpt2", "llama", "ioi")
def invokes_in_a_loop_using_loop_variable(model, S):
    results = {}
    with model.trace() as tracer:
        for layer in range(3):
            with tracer.invoke(S.B):
                S.layers(model)[layer].output[:, -1] = 0
                results[f"layer{layer}"] = model.lm_head.output[0, -1].save()
    return results


@program()
def invokes_trace_level_variable_rebound(model, S):
    with model.trace() as tracer:
        k = 0
        with tracer.invoke(S.A):
            S.layers(model)[k].output[:, -1] = 0
            first = model.lm_head.output[0, -1].save()
        k = 2
        with tracer.invoke(S.A):
            S.layers(model)[k].output[:, -1] = 0
            second = model.lm_head.output[0, -1].save()
    return {"first": first, "second": second}


@program()
def invokes_four_lengths(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.ONE):
            l1 = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.SHORT):
            l3 = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.A):
            l6 = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.LONG):
            l8 = model.lm_head.output[:, -1].save()
    return {"l1": l1, "l3": l3, "l6": l6, "l8": l8}


@program("gpt2", "llama", "ioi")
def invokes_padded_model_output(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.SHORT):
            short_last = model.output.logits[:, -1].save()
        with tracer.invoke(S.LONG):
            long_last = model.output.logits[:, -1].save()
    return {"short_last": short_last, "long_last": long_last}


@program()
def patch_reassigned_variable_with_barrier(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            h = S.layers(model)[0].output[:, -1]
            h = S.layers(model)[1].output[:, -1]
            barrier()
        with tracer.invoke(S.B):
            barrier()
            S.layers(model)[1].output[:, -1] = h
            patched = model.lm_head.output[:, -1].save()
    return {"patched": patched}


@program()
def patch_from_prompt_list_into_single(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke([S.A, S.B]):
            src = S.layers(model)[1].output[1:2, -1]
            barrier()
        with tracer.invoke(S.C):
            barrier()
            S.layers(model)[1].output[:, -1] = src
            patched = model.lm_head.output[:, -1].save()
    return {"patched": patched}


@program()
def patch_single_into_prompt_list(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.C):
            src = S.layers(model)[0].output[:, -1]
            barrier()
        with tracer.invoke([S.A, S.B]):
            barrier()
            S.layers(model)[0].output[:, -1] = src
            patched = model.lm_head.output[:, -1].save()
    return {"patched": patched}


@program()
def patch_one_token_prompts_both(model, S):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.ONE):
            src = S.layers(model)[0].output
            barrier()
        with tracer.invoke(S.ONE):
            barrier()
            S.layers(model)[0].output = src * 2
            patched = model.lm_head.output.save()
    return {"patched": patched}


@program()
def edit_inputs_assignment(model, S):
    with model.trace(S.A):
        args, kwargs = S.layers(model)[1].inputs
        S.layers(model)[1].inputs = ((args[0] * 2,) + tuple(args[1:]), kwargs)
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_lm_head_input(model, S):
    with model.trace(S.B):
        model.lm_head.input[:, -1] = S.vec(7)
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def edit_with_torch_where(model, S):
    with model.trace(S.C):
        h = S.layers(model)[1].output
        S.layers(model)[1].output = torch.where(h > 0, h, torch.zeros_like(h))
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def read_attention_tuple_saved_whole(model, S):
    with model.trace(S.A):
        out = S.attn(model, 0).output.save()
        n = S.save(len(out))
    return {"out0": out[0], "n": n}


@program()
def read_model_output_object(model, S):
    with model.trace(S.C):
        out = model.output.save()
    return {"logits": out.logits}


@program()
def read_token_id_list(model, S):
    with model.trace([5, 7, 9, 11]):
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def read_shape_as_python_int(model, S):
    with model.trace(S.A):
        n = S.save(S.layers(model)[0].output.shape[1])
        d = S.save(int(S.layers(model)[0].output.shape[-1]))
    return {"n": n, "d": d}


@program()
def flow_stop_early(model, S):
    with model.trace(S.A) as tracer:
        h = S.layers(model)[0].output.save()
        tracer.stop()
    return {"h": h}


class _Patcher:
    def __init__(self, layer, scale):
        self.layer, self.scale = layer, scale

    def apply(self, model, S):
        S.layers(model)[self.layer].output[:, -1] *= self.scale


def _last_positions(model, S):
    out = []
    for i in range(S.n):
        out.append(S.layers(model)[i].output[:, -1])
    return out


def _outer_helper(model, S):
    return _read_last(model, S, 1) * 2


@program()
def helper_method_of_a_class(model, S):
    patcher = _Patcher(1, 0.0)
    with model.trace(S.A):
        patcher.apply(model, S)
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def helper_returns_a_list(model, S):
    with model.trace(S.B):
        hs = S.save(_last_positions(model, S))
    return {f"h{i}": t for i, t in enumerate(hs)}


@program()
def helper_calls_helper(model, S):
    with model.trace(S.C):
        doubled = _outer_helper(model, S).save()
    return {"doubled": doubled}


@program()
def helper_in_two_invokes(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            a = _read_last(model, S, 2).save()
        with tracer.invoke(S.SHORT):
            _zero_position(model, S, 0, -1)
            b = _read_last(model, S, 2).save()
    return {"a": a, "b": b}


@program()
def flow_closure_over_invoke_variable(model, S):
    with model.trace(S.A):
        scale = 3.0
        scaled = lambda t: t * scale  # noqa: E731
        h = scaled(S.layers(model)[1].output).save()
    return {"h": h}


@program()
def flow_generator_expression(model, S):
    with model.trace(S.B):
        total = sum(S.layers(model)[i].output[0, -1].norm() for i in range(S.n)).save()
    return {"total": total}


@program()
def flow_try_except(model, S):
    with model.trace(S.C):
        h = None
        try:
            h = S.layers(model)[1].output
            missing = {}["key"]  # noqa: F841
        except KeyError:
            h = h * -1
        kept = h.save()
    return {"kept": kept}


@program()
def grad_after_steering(model, S):
    v = S.vec(8)
    with model.trace(S.A):
        S.layers(model)[0].output[:, -1] += v
        h = S.layers(model)[1].output
        with metric(model.lm_head.output, S).backward():
            g = h.grad.save()
    return {"g": g}


@program()
def grad_of_logits_themselves(model, S):
    with model.trace(S.B):
        logits = model.lm_head.output
        with metric(logits, S).backward():
            g = logits.grad.save()
    return {"g": g}


@program()
def grad_prompt_list_padded(model, S):
    n = S.len(S.SHORT)
    with model.trace([S.SHORT, S.A]):
        h = S.layers(model)[1].output
        logits = model.lm_head.output
        with (logits[:, -1, S.ANS] - logits[:, -1, S.WRONG]).sum().backward():
            g_long = h.grad[1].save()
            g_short = h.grad[0, -n:].save()
    return {"g_long": g_long, "g_short": g_short}


@program("gpt2e", "llamae",
         xfail="nnpatch hands out a clone of every module output, so an output the model had already "
               "used before returning it (eager attention weights, used for the attention output) "
               "is not on the path to the loss: its .grad is None on nnpatch; nnsight gives the "
               "gradient of the weights the model used")
def grad_of_attention_weights(model, S):
    with model.trace(S.A):
        w = S.attn(model, 1).output[1]
        with metric(model.lm_head.output, S).backward():
            g = w.grad.save()
    return {"g": g}


def ref_equal_prompts_nobarrier(hf, S):
    logits, _ = layer_outputs(hf, S, S.A)
    return {"patched": logits[:, -1] * 1.0}


@program(ref=ref_equal_prompts_nobarrier, nnsight_raises=NameError)
def nobarrier_equal_prompts_patch_is_identity(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            S.layers(model)[2].output[:] = src  # noqa: F821
            patched = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.A):
            src = S.layers(model)[2].output
    return {"patched": patched}


def ref_prompt_list_source(hf, S):
    _, b = layer_outputs(hf, S, S.B)

    def put(t):
        t[:, -1] = b[1][:, -1]
    return {"patched": layer_outputs(hf, S, S.C, {1: put})[0][:, -1]}


@program(ref=ref_prompt_list_source, nnsight_raises=NameError)
def nobarrier_prompt_list_source(model, S):
    with model.trace() as tracer:
        with tracer.invoke([S.A, S.B]):
            src = S.layers(model)[1].output[1:2, -1]
        with tracer.invoke(S.C):
            S.layers(model)[1].output[:, -1] = src
            patched = model.lm_head.output[:, -1].save()
    return {"patched": patched}


# =================================================================================================
# 10. Plain torch modules: nnpatch.Model against nnsight.NNsight
# =================================================================================================

class TinyNet(torch.nn.Module):
    """A plain module with a tuple-returning child (kind "net")."""

    class Pair(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin = torch.nn.Linear(d, d)

        def forward(self, x):
            y = self.lin(x)
            return y, y * 2

    def __init__(self, d_in=4, d=8, d_out=3):
        super().__init__()
        self.inp = torch.nn.Linear(d_in, d)
        self.pair = TinyNet.Pair(d)
        self.act = torch.nn.Tanh()
        self.out = torch.nn.Linear(d, d_out)

    def forward(self, x):
        a, b = self.pair(self.inp(x))
        return self.out(self.act(self.act(a + b)))  # act runs twice; .output is its first call


class NetSite:
    def __init__(self, lib, save):
        self.lib, self.save = lib, save
        g = torch.Generator().manual_seed(11)
        self.X1 = torch.randn(2, 4, generator=g)
        self.X2 = torch.randn(3, 4, generator=g)


@program("net")
def net_reads(model, S):
    with model.trace(S.X1):
        h = model.inp.output.save()
        a = model.pair.output[0].save()
        b = model.pair.output[1].save()
        y = model.output.save()
    return {"h": h, "a": a, "b": b, "y": y}


@program("net")
def net_edit_tuple_element(model, S):
    with model.trace(S.X2):
        model.pair.output[0][:, :2] = 0
        y = model.out.output.save()
    return {"y": y}


@program("net")
def net_edit_input_and_replace_output(model, S):
    with model.trace(S.X1):
        model.act.output = model.act.output.clamp(min=0)
        model.out.input[:] *= 2
        y = model.output.save()
    return {"y": y}


@program("net")
def net_gradients_reverse_order(model, S):
    with model.trace(S.X2):
        h = model.inp.output
        t = model.act.output
        with model.output.sum().backward():
            gt = t.grad.save()
            gh = h.grad.save()
    return {"gt": gt, "gh": gh}


def ref_net_two_invokes(net, S):
    with torch.no_grad():
        a1, _ = net.pair(net.inp(S.X1))
        h2 = net.inp(S.X2)
        a2, b2 = net.pair(h2)
        a2 = a2.clone()
        a2[:2] = a1
        y = net.out(net.act(net.act(a2 + b2)))
    return {"y": y}


@program("net", ref=ref_net_two_invokes, nnsight_raises=NotImplementedError)
def net_two_invokes_patch(model, S):
    # nnsight.NNsight cannot batch invokes of a plain module; nnpatch concatenates them
    with model.trace() as tracer:
        with tracer.invoke(S.X1):
            first = model.pair.output[0]
        with tracer.invoke(S.X2):
            model.pair.output[0][:2] = first
            y = model.output.save()
    return {"y": y}


@program("net")
def net_module_called_twice_first_call(model, S):
    with model.trace(S.X1):
        first = model.act.output.save()
        model.act.output[:, 0] = 0
        y = model.output.save()
    return {"first": first, "y": y}


# =================================================================================================
# 11. Module-tree spellings, inputs and padding details
# =================================================================================================

@program()
def read_negative_layer_index(model, S):
    with model.trace(S.A):
        h = S.layers(model)[-1].output.save()
    return {"h": h}


@program()
def read_iterating_the_layer_list(model, S):
    with model.trace(S.B):
        hs = []
        for layer in S.layers(model):
            hs.append(layer.output[0, -1])
        hs = S.save(hs)
    return {f"h{i}": t for i, t in enumerate(hs)}


@program()
def read_slice_of_the_layer_list(model, S):
    with model.trace(S.C):
        hs = []
        for layer in S.layers(model)[1:]:
            hs.append(layer.output[0, -1])
        hs = S.save(hs)
    return {f"h{i}": t for i, t in enumerate(hs)}


@program()
def read_manual_unembedding_with_weights(model, S):
    with model.trace(S.A):
        h = S.layers(model)[1].output
        direct = (h @ model.lm_head.weight.T).save()
    return {"direct": direct}


@program()
def read_keyword_input_ids(model, S):
    with model.trace(input_ids=S.ids(S.A)):
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program()
def read_token_id_tensors_of_different_lengths(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.ids(S.SHORT)):
            a = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.ids(S.A)):
            b = model.lm_head.output[:, -1].save()
    return {"a": a, "b": b}


@program()
def edit_after_save_the_saved_value_sees_it(model, S):
    # a saved module value is the live tensor: a later in-place edit shows in it
    with model.trace(S.A):
        h = S.layers(model)[0].output.save()
        S.layers(model)[0].output[:, -1] = 0
    return {"h": h}


@program()
def edit_prompt_list_with_padding(model, S):
    with model.trace([S.SHORT, S.A]):
        S.layers(model)[1].output[:, -1] = 0
        logits = model.lm_head.output[:, -1].save()
    return {"logits": logits}


def ref_own_length_tensor(hf, S):
    logits, _ = layer_outputs(hf, S, S.SHORT, {0: lambda t: torch.zeros(1, S.len(S.SHORT), S.d)})
    return {"l": logits[:, -1]}


@program(ref=ref_own_length_tensor, nnsight_raises=RuntimeError)
def padding_assign_tensor_of_own_length(model, S):
    # nnpatch: a left-padded invoke's value has its own length (nnsight: the batch's)
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            pass
        with tracer.invoke(S.SHORT):
            S.layers(model)[0].output = torch.zeros(1, S.len(S.SHORT), S.d)
            l = model.lm_head.output[:, -1].save()
    return {"l": l}


@program()
def padding_right_padded_tokenizer_output(model, S):
    n = S.len(S.SHORT)
    enc = S.tokenizer([S.SHORT, S.A], padding=True, padding_side="right", return_tensors="pt")
    with model.trace(enc):
        short_tokens = S.layers(model)[1].output[0, :n].save()
        long_row = S.layers(model)[1].output[1].save()
        short_logits = model.lm_head.output[0, :n].save()
    return {"short_tokens": short_tokens, "long_row": long_row, "short_logits": short_logits}


def ref_reread_in_backward(hf, S):
    return ref_layer_grads(hf, S, S.A, [0, 2])


@program(ref=ref_reread_in_backward, nnsight_raises="OutOfOrderError")
def anyorder_module_value_reread_inside_backward(model, S):
    with model.trace(S.A):
        S.layers(model)[0].output  # noqa: B018 - read in the forward pass
        S.layers(model)[2].output  # noqa: B018
        with metric(model.lm_head.output, S).backward():
            g0 = S.layers(model)[0].output.grad.save()
            g2 = S.layers(model)[2].output.grad.save()
    return {"g0": g0, "g2": g2}


# =================================================================================================
# 12. More gradients, empty invokes and generation
# =================================================================================================

@program()
def grad_two_backwards_in_one_invoke(model, S):
    with model.trace(S.A):
        h = S.layers(model)[1].output
        logits = model.lm_head.output
        with logits[0, -1, S.ANS].backward(retain_graph=True):
            g_ans = h.grad.clone().save()
        with logits[0, -1, S.WRONG].backward():
            g_wrong = h.grad.clone().save()
    return {"g_ans": g_ans, "g_wrong": g_wrong}


@program()
def grad_of_a_steering_vector_leaf(model, S):
    v = torch.zeros(S.d, requires_grad=True)
    with model.trace(S.B):
        S.layers(model)[1].output[:, -1] += v
        with metric(model.lm_head.output, S).backward():
            g = v.grad.save()
    return {"g": g}


def ref_grad_through_patch(hf, S):
    _, clean = layer_outputs(hf, S, S.A)
    src = clean[1][:, -1].clone().requires_grad_(True)

    def put(o):
        t = o.clone()
        t[:, -1] = src
        return t
    logits = fwd(hf, S.ids(S.B), [(S.layers(hf)[1], put)], grad=True)
    (g,) = torch.autograd.grad(metric(logits, S), src)
    return {"g": g}


@program(ref=ref_grad_through_patch)
def grad_through_a_patched_value(model, S):
    # nnsight 0.8.1 crashes the interpreter (segfault) on this program, so it has a reference
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            clean = S.layers(model)[1].output[:, -1]
            barrier()
        with tracer.invoke(S.B):
            barrier()
            S.layers(model)[1].output[:, -1] = clean
            with metric(model.lm_head.output, S).backward():
                g = clean.grad.save()
    return {"g": g}


@program()
def invokes_empty_invoke_sees_whole_batch(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            a = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.B):
            b = model.lm_head.output[:, -1].save()
        with tracer.invoke():
            every = model.lm_head.output[:, -1].save()
    return {"a": a, "b": b, "every": every}


@program()
def generate_three_tokens(model, S):
    with model.generate(S.A, max_new_tokens=3, do_sample=False):
        tokens = model.generator.output.save()
    return {"tokens": tokens}


# =================================================================================================
# 13. More of what only nnpatch runs: multi-pass and mutual dependencies
# =================================================================================================

def ref_of_padded(hf, S):
    _, short = layer_outputs(hf, S, S.SHORT)

    def put(t):
        t[:, -1] = short[1][:, -1]
    return {"patched": layer_outputs(hf, S, S.A, {1: put})[0][:, -1], "seen": short[1]}


@program(ref=ref_of_padded)
def nnpatch_model_of_a_padded_invoke(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.SHORT) as short_run:
            pass
        with tracer.invoke(S.A):
            seen = S.layers(model.of(short_run))[1].output.clone().save()
            S.layers(model)[1].output[:, -1] = seen[:, -1]
            patched = model.lm_head.output[:, -1].save()
    return {"patched": patched, "seen": seen}


def ref_mutual_exchange(hf, S):
    _, a = layer_outputs(hf, S, S.A)
    _, b = layer_outputs(hf, S, S.B)

    def put_b(t):
        t[:, -1] = b[0][:, -1]

    def put_a(t):
        t[:, -1] = a[0][:, -1]
    return {"la": layer_outputs(hf, S, S.A, {2: put_b})[0][:, -1],
            "lb": layer_outputs(hf, S, S.B, {1: put_a})[0][:, -1]}


@program(ref=ref_mutual_exchange, nnsight_raises=NameError)
def nobarrier_mutual_exchange(model, S):
    # each invoke patches a later layer with the other's layer-0 value
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            from_a = S.layers(model)[0].output[:, -1].clone()
            S.layers(model)[2].output[:, -1] = from_b  # noqa: F821
            la = model.lm_head.output[:, -1].save()
        with tracer.invoke(S.B):
            from_b = S.layers(model)[0].output[:, -1].clone()
            S.layers(model)[1].output[:, -1] = from_a
            lb = model.lm_head.output[:, -1].save()
    return {"la": la, "lb": lb}


def ref_late_into_early_grad(hf, S):
    _, a = layer_outputs(hf, S, S.A)

    def put(o):
        t = o.clone()
        t[:, -1] = a[S.n - 1][:, -1]
        return t
    _, grads, logits = autograd_of(hf, S, S.B, {1: (S.layers(hf)[1], "output")},
                                   edit_forward=[(S.layers(hf)[0], put)])
    return {"g": grads[1], "logits": logits[:, -1]}


@program("gpt2", "llama", "ioi", ref=ref_late_into_early_grad, nnsight_raises=NameError)
def nobarrier_late_into_early_with_gradient(model, S):
    # the patched invoke needs a second pass, and takes a gradient in it
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            late = S.layers(model)[S.n - 1].output[:, -1]
        with tracer.invoke(S.B):
            S.layers(model)[0].output[:, -1] = late
            h = S.layers(model)[1].output
            logits = model.lm_head.output
            with metric(logits, S).backward():
                g = h.grad.save()
            last = logits[:, -1].save()
    return {"g": g, "logits": last}


# The generation programs (model.generate, tracer.iter / all) live in their own file.
import nnsight_programs_generation  # noqa: E402,F401 - registers its programs in PROGRAMS
