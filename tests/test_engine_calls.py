"""Calling modules inside a trace, promptless invokes, and traces from several threads.

Values are compared with plain PyTorch on the same weights.
"""
import threading

import pytest
import torch

import nnpatch
from conftest import all_hooks, block_envoys, block_outputs, blocks, close, first, ids, prompt

A = prompt(1, 2, 3, 4, 5, 6)
B = prompt(1, 2, 9, 4, 5, 6)
SHORT = prompt(7, 8, 9)








def final_norm(hf):
    return hf.transformer.ln_f if hasattr(hf, "transformer") else hf.model.norm






def norm_envoy(lm):
    return lm.transformer.ln_f if hasattr(lm, "transformer") else lm.model.norm


# -- calling a module inside a trace (the logit lens) ---------------------------------------------------

def test_logit_lens_calls_modules_aside_from_the_trace(lm, hf):
    logits, outs = block_outputs(hf, A)
    with torch.no_grad():
        want = [hf.lm_head(final_norm(hf)(outs[i])) for i in range(3)]
    layers = block_envoys(lm)
    with torch.no_grad():
        with lm.trace(A):
            lens = [lm.lm_head(norm_envoy(lm)(first(layers[i].output))).save() for i in range(3)]
            final = lm.lm_head.output.save()  # the trace's own read of lm_head: the real one
    assert all(close(g, w) for g, w in zip(lens, want))
    assert close(final, logits)
    assert all_hooks(hf) == 0


def test_a_module_call_is_not_patched_by_the_trace(lm, hf):
    _, outs = block_outputs(hf, A)
    layers = block_envoys(lm)
    with torch.no_grad():
        with lm.trace(A):
            h = first(layers[0].output)
            lm.lm_head.output[:] = 0           # edits the trace's own lm_head call only
            aside = lm.lm_head(norm_envoy(lm)(h)).save()
    with torch.no_grad():
        assert close(aside, hf.lm_head(final_norm(hf)(outs[0])))
    assert not torch.equal(aside, torch.zeros_like(aside))


# -- a promptless invoke acts on the whole batch ----------------------------------------------------------

def test_promptless_invoke_sees_and_edits_every_row(lm, hf):
    la, a = block_outputs(hf, A)
    lb, b = block_outputs(hf, B)
    layers = block_envoys(lm)
    with torch.no_grad():
        with lm.trace() as tracer:
            with tracer.invoke(A):
                out_a = lm.output.logits.save()
            with tracer.invoke(B):
                out_b = lm.output.logits.save()
            with tracer.invoke():
                everything = first(layers[1].output).clone().save()
    assert close(everything, torch.cat([a[1], b[1]]))
    assert close(out_a, la) and close(out_b, lb)

    def zero_last(h):
        h = h.clone()
        h[:, -1] = 0
        return h
    handle = blocks(hf)[1].register_forward_hook(lambda m, i, o: (zero_last(o[0]),) + tuple(o[1:])
                                                  if isinstance(o, tuple) else zero_last(o))
    try:
        ref_a, ref_b = block_outputs(hf, A)[0], block_outputs(hf, B)[0]
    finally:
        handle.remove()
    with torch.no_grad():
        with lm.trace() as tracer:
            with tracer.invoke(A):
                out_a = lm.output.logits.save()
            with tracer.invoke(B):
                out_b = lm.output.logits.save()
            with tracer.invoke():
                first(layers[1].output)[:, -1] = 0
    assert close(out_a, ref_a) and close(out_b, ref_b)


def test_only_promptless_invokes_is_a_clear_error(lm, hf):
    with pytest.raises(nnpatch.NNPatchError, match="promptless"):
        with lm.trace() as tracer:
            with tracer.invoke():
                lm.output.save()
    assert all_hooks(hf) == 0


# -- threads ---------------------------------------------------------------------------------------------

def test_a_plain_forward_from_another_thread_is_not_intercepted(lm, hf):
    la, _ = block_outputs(hf, A)
    lb, _ = block_outputs(hf, SHORT)
    layers = block_envoys(lm)
    seen = {}
    started, release = threading.Event(), threading.Event()

    def other_thread():
        started.wait(10)
        with torch.no_grad():
            seen["logits"] = hf(ids(SHORT)).logits
        release.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with torch.no_grad():
        with lm.trace(A):
            first(layers[0].output)[:] = 0  # the trace's edit: must not reach the other thread
            started.set()
            release.wait(10)                  # the plain forward runs while the trace is paused
            out = lm.output.logits.save()
    worker.join(10)
    assert close(seen["logits"], lb)
    assert not close(out, la)  # the trace's own edit did land in its own run


def test_traces_and_sweeps_from_two_threads_both_work(lm, hf):
    la, _ = block_outputs(hf, A)
    lb, _ = block_outputs(hf, B)
    layers = block_envoys(lm)
    results, errors = {}, []

    def trace(name, text):
        try:
            for _ in range(3):
                with torch.no_grad():
                    with lm.trace(text):
                        h = first(layers[1].output)
                        logits = lm.output.logits.save()
                results[name] = logits
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def sweep():
        try:
            results["sweep"] = nnpatch.activation_patching(
                lm, A, B, answer="t5", wrong="t6", by=("layer",), progress=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=trace, args=("a", A)), threading.Thread(target=trace, args=("b", B)),
               threading.Thread(target=sweep)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert close(results["a"], la) and close(results["b"], lb)
    alone = nnpatch.activation_patching(lm, A, B, answer="t5", wrong="t6", by=("layer",), progress=False)
    assert torch.allclose(results["sweep"].values, alone.values, atol=1e-5)
    assert all_hooks(hf) == 0
