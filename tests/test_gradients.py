"""Gradients in traces against torch.autograd on separate, unbatched runs of the same weights."""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnpatch
from conftest import all_hooks, block_envoys, blocks, gpt2, ids, prompt, word_tokenizer
from nnpatch.engine import compile_source

A = prompt(3, 5, 7, 9, 11, 13)
SHORT = prompt(20, 21, 22, 23)
ANS, WRONG = 11, 23


def metric(logits):
    return logits[0, -1, ANS] - logits[0, -1, WRONG]


def reference_grads(hf, text, edit=None):
    """Block outputs and their gradients from a plain forward + backward.

    edit: (layer, fn) replaces the gradient flowing back from that block's output, via a tensor hook.
    """
    outs = {}

    def keep(i):
        def hook(m, args, out):
            out.retain_grad()
            if edit is not None and edit[0] == i:
                out.register_hook(edit[1])
            outs[i] = out
        return hook

    handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(blocks(hf))]
    try:
        logits = hf(ids(text)).logits
    finally:
        for h in handles:
            h.remove()
    metric(logits).backward()
    hf.zero_grad(set_to_none=True)
    return {i: (o.detach(), o.grad) for i, o in outs.items()}


def close(a, b, tol=1e-5):
    return a is not None and b is not None and a.shape == b.shape and \
        torch.allclose(a.double(), b.double(), atol=tol, rtol=tol)


def test_backward_block_reads_gradients_in_forward_order(lm, hf):
    ref = reference_grads(hf, A)
    layers = block_envoys(lm)
    grads = []
    with lm.trace(A):
        hs = [layers[i].output for i in range(3)]
        with metric(lm.output.logits).backward():
            for i in range(3):                       # forward order: no reversal needed
                grads.append(layers[i].output.grad.save())
    for i in range(3):
        assert close(grads[i], ref[i][1])
        assert close(hs[i].grad, ref[i][1])          # .grad stays available after the trace
    # Like PyTorch's backward, the trace's accumulates into the parameters that require grad.
    traced = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad(set_to_none=True)
    metric(hf(ids(A)).logits).backward()
    assert all(close(traced[n], p.grad) for n, p in hf.named_parameters())
    hf.zero_grad(set_to_none=True)
    assert all_hooks(hf) == 0


def test_multi_invoke_gradients_equal_unbatched(lm, hf):
    ref_a = reference_grads(hf, A)
    ref_s = reference_grads(hf, SHORT)
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(SHORT):                    # shorter prompt: left-padded in the batch
            s_mid = layers[1].output
            metric(lm.output.logits).backward()       # plain call, no with-block
            s_grad = s_mid.grad
        with tracer.invoke(A):
            a0 = layers[0].output
            a2 = layers[2].output
            with metric(lm.output.logits).backward():
                g2, g0 = a2.grad, a0.grad             # any order
    assert close(s_grad, ref_s[1][1])
    assert close(g0, ref_a[0][1]) and close(g2, ref_a[2][1])


def test_slices_and_views_get_gradients(lm, hf):
    ref = reference_grads(hf, A)
    layers = block_envoys(lm)
    with lm.trace(A):
        h = layers[1].output
        window = h[:, 2:4]
        last = h[0, -1]
        with metric(lm.output.logits).backward():
            gw = window.grad.save()
            gl = last.grad.save()
    assert close(gw, ref[1][1][:, 2:4])
    assert close(gl, ref[1][1][0, -1])


def test_gradient_edit_replaces_what_flows_back(lm, hf):
    scale = lambda g: g * 3.0 - 0.5  # noqa: E731
    ref = reference_grads(hf, A, edit=(2, scale))
    layers = block_envoys(lm)
    with lm.trace(A):
        h0 = layers[0].output
        h2 = layers[2].output
        with metric(lm.output.logits).backward():
            before = h0.grad.clone().save()           # read first, edit later: any order
            h2.grad = h2.grad * 3.0 - 0.5
            after = h0.grad.save()
            edited = h2.grad.save()
    assert close(edited, ref[2][1])
    assert close(after, ref[0][1])
    assert not close(before, after)


def test_parameters_and_model_untouched_by_backward(lm, hf):
    hf.requires_grad_(False)  # a frozen model: module values still get gradients, parameters none
    with torch.no_grad():
        before = hf(ids(A)).logits
    with lm.trace(A):
        h = block_envoys(lm)[0].output
        with metric(lm.output.logits).backward():
            g = h.grad
    assert g is not None
    with pytest.raises(nnpatch.NNPatchError, match="before calling backward"):
        with lm.trace(A):
            with metric(lm.output.logits).backward():
                block_envoys(lm)[1].output.grad
    assert all_hooks(hf) == 0
    assert all(p.grad is None for p in hf.parameters())
    with torch.no_grad():
        assert torch.equal(hf(ids(A)).logits, before)


# -- property-based: random sites, read orders and invoke counts ----------------------------------

SITES = ["transformer.h.{i}", "transformer.h.{i}.mlp", "transformer.h.{i}.attn.c_proj"]
RUN_ORDER = {SITES[2]: 0, SITES[1]: 1, SITES[0]: 2}  # inside a block: attention, MLP, block output
MODEL = gpt2(n_layer=3, d=32, seed=1)
LM = nnpatch.LanguageModel(MODEL, tokenizer=word_tokenizer())


def envoy_expr(site, i):
    parts = site.format(i=i).split(".")
    out = "LM"
    for p in parts:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def reference_site_grads(text, reads, answer):
    got = {}

    def keep(key):
        def hook(m, args, out):
            out.retain_grad()
            got[key] = out
        return hook

    handles = []
    for key in set(reads):
        site, i = key
        module = MODEL.get_submodule(site.format(i=i))
        handles.append(module.register_forward_hook(keep(key)))
    try:
        logits = MODEL(ids(text)).logits
    finally:
        for h in handles:
            h.remove()
    (logits[0, -1, answer] - logits[0, -1, 0]).backward()
    MODEL.zero_grad(set_to_none=True)
    return {k: v.grad for k, v in got.items()}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_gradient_programs(data):
    n_inv = data.draw(st.integers(1, 3))
    rng = random.Random(data.draw(st.integers(0, 10**6)))
    lines = ["with LM.trace() as tracer:"]
    expected = []
    for k in range(n_inv):
        length = rng.randint(2, 7)
        text = prompt(*[rng.randint(2, 50) for _ in range(length)])
        reads = rng.sample([(s, i) for s in SITES for i in range(3)], rng.randint(1, 4))
        forward_order = sorted(reads, key=lambda r: (r[1], RUN_ORDER[r[0]]))
        answer = rng.randint(2, 50)
        backward = k == 0 or rng.random() < 0.7
        lines.append(f"    with tracer.invoke({text!r}):")
        for j, (site, i) in enumerate(forward_order):
            lines.append(f"        v{k}_{j} = {envoy_expr(site, i)}.output")
        lines.append("        logits = LM.lm_head.output")
        if backward:
            lines.append(f"        with (logits[0, -1, {answer}] - logits[0, -1, 0]).backward():")
            order = list(range(len(forward_order)))
            rng.shuffle(order)                       # any order
            for j in order:
                lines.append(f"            g{k}_{j} = v{k}_{j}.grad")
            expected.append((k, text, forward_order, answer))
        else:
            lines.append("        pass")
    ns = {"LM": LM}
    exec(compile_source("\n".join(lines) + "\n", f"<grad-program-{rng.random()}>"), ns)
    for k, text, forward_order, answer in expected:
        ref = reference_site_grads(text, forward_order, answer)
        for j, key in enumerate(forward_order):
            assert close(ns[f"g{k}_{j}"], ref[key]), ("\n".join(lines), key)
    assert all_hooks(MODEL) == 0


def test_gradient_of_a_short_invokes_module_that_only_it_reads():
    # Regression: the second, shorter invoke (left-padded by 3) reads a module no other invoke
    # reads; its gradient is one block of the batched gradient, which autograd hands out as a
    # view starting mid-buffer. Read at the wrong offset it came back all zeros.
    long_text, short_text, answer = "t4 t35 t9 t34 t14 t27 t24", "t8 t22 t21 t3", 9
    with LM.trace() as tracer:
        with tracer.invoke(long_text):
            LM.transformer.h[0].output
        with tracer.invoke(short_text):
            mlp = LM.transformer.h[0].mlp.output
            logits = LM.lm_head.output
            with (logits[0, -1, answer] - logits[0, -1, 0]).backward():
                g = mlp.grad
    key = ("transformer.h.{i}.mlp", 0)
    ref = reference_site_grads(short_text, [key], answer)[key]
    assert ref.abs().sum() > 0 and close(g, ref)
    assert all_hooks(MODEL) == 0
