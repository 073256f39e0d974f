"""How invokes meet: variables handed over at their final value or at a barrier, statements run
once, grad mode and autocast per invoke, and failed traces that leave nothing behind.

Every value is compared with a plain-PyTorch hook reference on the same weights.
"""
import gc
import weakref

import pytest
import torch

import nnpatch
from conftest import all_hooks, block_envoys, block_outputs, blocks, close, first, ids, prompt

A = prompt(1, 2, 3, 4, 5, 6)
B = prompt(1, 2, 9, 4, 5, 6)
SHORT = prompt(7, 8)










class Passes:
    """Counts the model's forward calls (one per forward pass of a trace)."""

    def __init__(self, hf):
        self.n = 0
        self.handle = hf.register_forward_pre_hook(self.count)

    def count(self, *args):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- a variable is handed over at its final value (1a) ---------------------------------------------



def test_reassigned_variable_reaches_the_reader_at_its_last_value(lm, hf):
    _, a = block_outputs(hf, A)
    want = a[1][:, -1] + a[2][:, -1]

    def patch(h):
        h[:, -1] = want
        return h
    ref, _ = block_outputs(hf, B, {2: patch})
    layers = block_envoys(lm)
    with Passes(hf) as passes:
        with lm.trace() as tracer:
            with tracer.invoke(A):
                hs = first(layers[1].output)[:, -1]
                hs = hs + first(layers[2].output)[:, -1]
            with tracer.invoke(B):
                got = hs
                first(layers[2].output)[:, -1] = hs
                logits = lm.output.logits.save()
    assert close(got, want) and close(logits, ref)
    assert passes.n == 1  # one forward can deliver it, so one runs


def test_barrier_hands_over_the_value_held_at_the_barrier(lm, hf):
    _, a = block_outputs(hf, A)
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(A):
            hs = first(layers[1].output)[:, -1]
            hs = hs + first(layers[2].output)[:, -1]
            barrier()
            hs = hs * 0  # after the meeting: the reader does not see this
        with tracer.invoke(B):
            barrier()
            got = (hs + 0).save()
    assert close(got, a[1][:, -1] + a[2][:, -1])


def test_barrier_before_the_reassignment_hands_over_the_earlier_value(lm, hf):
    _, a = block_outputs(hf, A)
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(A):
            hs = first(layers[1].output)[:, -1]
            barrier()
            hs = hs + first(layers[2].output)[:, -1]
        with tracer.invoke(B):
            barrier()
            got = (hs + 0).save()
    assert close(got, a[1][:, -1])


def test_variable_assigned_in_a_loop_is_read_after_the_loop(lm, hf):
    _, a = block_outputs(hf, A)
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(A):
            total = 0
            for i in range(3):
                total = total + first(layers[i].output)[:, -1]
        with tracer.invoke(B):
            got = (total * 1).save()
    assert close(got, a[0][:, -1] + a[1][:, -1] + a[2][:, -1])


def test_misplaced_barrier_runs_a_second_pass_not_a_stale_one(lm, hf):
    # The forum thread's shape: the patching invoke meets the others only after they read the
    # logits, yet patches an early layer: nnpatch gives it a pass of its own.
    _, a = block_outputs(hf, A)

    def patch(h):
        h[:, -1] = a[0][:, -1]
        return h
    ref, _ = block_outputs(hf, B, {0: patch})
    layers = block_envoys(lm)
    with Passes(hf) as passes:
        with lm.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(A):
                clean = first(layers[0].output)[:, -1]
                clean_logits = lm.output.logits
                barrier()
            with tracer.invoke(B):
                barrier()
                first(layers[0].output)[:, -1] = clean
                patched = lm.output.logits.save()
    assert close(patched, ref)
    assert passes.n == 2


def test_maintainer_style_barriers_run_in_one_pass(lm, hf):
    _, a = block_outputs(hf, A)

    def patch(h):
        h[:, -1] = a[1][:, -1]
        return h
    ref, _ = block_outputs(hf, B, {1: patch})
    layers = block_envoys(lm)
    with Passes(hf) as passes:
        with lm.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(A):
                clean = first(layers[1].output)[:, -1]
                barrier()
            with tracer.invoke(B):
                barrier()
                first(layers[1].output)[:, -1] = clean
                patched = lm.output.logits.save()
    assert close(patched, ref) and passes.n == 1


def test_a_barrier_nobody_else_reaches_is_a_clear_error(lm, hf):
    layers = block_envoys(lm)
    with pytest.raises(nnpatch.NNPatchError, match=r"barrier\(2\), which 1 of 2 invokes reached"):
        with lm.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(A):
                h = layers[0].output
            with tracer.invoke(B):
                barrier()
                x = layers[1].output
    assert all_hooks(hf) == 0


# -- statements run once (1f) -------------------------------------------------------------------------

def test_an_invoke_that_needs_a_second_pass_runs_each_statement_once(lm, hf):
    _, a = block_outputs(hf, A)

    def put(h):
        h[:, -1] = a[2][:, -1]
        return h
    ref, _ = block_outputs(hf, B, {0: put})
    layers = block_envoys(lm)
    log = []
    with Passes(hf) as passes:
        with lm.trace() as tracer:
            with tracer.invoke(A):
                late = first(layers[2].output)[:, -1]
            with tracer.invoke(B):
                log.append("start")
                h0 = first(layers[0].output)
                log.append(float(h0.norm()))
                h0[:, -1] = late            # waits for A's layer 2: B's clock stops at layer 0
                log.append("patched")
                scoped = lm.output.logits.save()
    assert close(scoped, ref)
    assert log[0] == "start" and log[2] == "patched" and len(log) == 3
    assert passes.n == 2
    assert all_hooks(hf) == 0


def test_edit_after_the_pause_lands_at_the_paused_layer(lm, hf):
    # B reads layer 0, then waits for A (layer 2), then edits what it read: the edit belongs to
    # layer 0, where B's clock stopped.
    _, a = block_outputs(hf, A)

    def put(h):
        h[:, 2] = a[2][:, 2] * 0.5
        return h
    ref, _ = block_outputs(hf, B, {0: put})
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(A):
            late = first(layers[2].output)
        with tracer.invoke(B):
            h0 = first(layers[0].output)
            h0[:, 2] = late[:, 2] * 0.5
            out = lm.output.logits.save()
    assert close(out, ref)


def test_three_invokes_chained_backwards_each_run_once(lm, hf):
    _, a = block_outputs(hf, A)

    def put_b(h):
        h[:, -1] = a[2][:, -1]
        return h
    _, b = block_outputs(hf, B, {0: put_b})

    def put_c(h):
        h[:, -1] = b[2][:, -1]
        return h
    ref, _ = block_outputs(hf, SHORT + " t1 t2 t3", {0: put_c})
    layers = block_envoys(lm)
    runs = []
    with lm.trace() as tracer:
        with tracer.invoke(A):
            runs.append("a")
            from_a = first(layers[2].output)[:, -1]
        with tracer.invoke(B):
            runs.append("b")
            first(layers[0].output)[:, -1] = from_a
            from_b = first(layers[2].output)[:, -1]
        with tracer.invoke(SHORT + " t1 t2 t3"):
            runs.append("c")
            first(layers[0].output)[:, -1] = from_b
            out = lm.output.logits.save()
    assert sorted(runs) == ["a", "b", "c"]
    assert close(out, ref, 1e-4)


# -- grad mode and autocast are per invoke (1d, 1e) -----------------------------------------------------

def test_no_grad_inside_one_invoke_does_not_reach_the_other(lm, hf):
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(A):
            with torch.no_grad():
                h = first(layers[0].output)
                x = first(layers[1].output)
        with tracer.invoke(B):
            hb = first(layers[0].output)
            loss = lm.output.logits[0, -1].sum()
            loss.backward()
            g = hb.grad.save()
    # reference gradient of B's logit sum with respect to block 0's output
    store = {}

    def keep(m, a, o):
        h = first(o)
        store["h"] = h
        h.retain_grad()
    handle = blocks(hf)[0].register_forward_hook(keep)
    try:
        hf(ids(B)).logits[0, -1].sum().backward()
    finally:
        handle.remove()
    hf.zero_grad(set_to_none=True)
    assert g is not None and close(g, store["h"].grad)


def test_autocast_inside_one_invoke_does_not_change_the_other(lm, hf):
    ref, _ = block_outputs(hf, B)
    layers = block_envoys(lm)
    with torch.no_grad():
        with lm.trace() as tracer:
            with tracer.invoke(A):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    h = first(layers[0].output)
                    x = first(layers[2].output)
            with tracer.invoke(B):
                logits = lm.output.logits.save()
    assert close(logits, ref, 1e-6)  # bfloat16 leaking into B's forward would be off by ~1e-2
    assert not torch.is_autocast_enabled("cpu")


def test_the_callers_grad_mode_rules_the_trace(lm, hf):
    layers = block_envoys(lm)
    with lm.trace(A):
        logits = lm.output.logits
    logits[0, -1].max().backward()  # no text in the body mentions gradients
    assert hf.lm_head.weight.grad is not None
    hf.zero_grad(set_to_none=True)

    def helper(value):
        value.backward()

    with lm.trace(A):
        h = first(layers[1].output)
        out = lm.output.logits[0, -1].sum()
    helper(out)
    assert hf.lm_head.weight.grad is not None
    hf.zero_grad(set_to_none=True)
    with torch.no_grad():
        with lm.trace(A):
            logits = lm.output.logits
    assert not logits.requires_grad
    with torch.inference_mode():
        with lm.trace(A):
            logits = lm.output.logits
    assert not logits.requires_grad
    assert torch.is_grad_enabled()


# -- one model per trace (1g) ---------------------------------------------------------------------------

def test_another_models_module_inside_a_trace_is_an_error(lm, hf, tok):
    other = nnpatch.LanguageModel(type(hf)(hf.config).eval(), tokenizer=tok)
    with pytest.raises(nnpatch.NNPatchError, match="another model"):
        with lm.trace(A):
            h = block_envoys(other)[0].output
    assert all_hooks(hf) == 0 and all_hooks(other.module) == 0
    same_module = nnpatch.LanguageModel(hf, tokenizer=tok)  # a second wrapper of the same module
    with lm.trace(A):
        h = first(block_envoys(same_module)[0].output).save()
    assert close(h, block_outputs(hf, A)[1][0])


# -- failures leave nothing behind (3) ------------------------------------------------------------------

def test_failed_trace_runs_paused_invokes_finally_blocks_and_frees_them(lm, hf):
    layers = block_envoys(lm)
    ran, held = [], []
    with pytest.raises(nnpatch.NNPatchError):
        with lm.trace() as tracer:
            with tracer.invoke(A):
                try:
                    h = first(layers[0].output)
                    held.extend(weakref.ref(t) for t in (h, h._base) if t is not None)
                    x = first(layers[2].output)
                finally:
                    ran.append("finally")
            with tracer.invoke(B):
                layers[1].output = torch.zeros(3)  # wrong shape: the trace fails here
    assert ran == ["finally"]
    gc.collect()
    assert held and all(ref() is None for ref in held)
    assert all_hooks(hf) == 0
    assert torch.is_grad_enabled()


def test_interrupt_inside_a_hook_leaves_no_hook_and_grad_mode_restored(lm, hf):
    layers = block_envoys(lm)

    def boom(*args):
        raise KeyboardInterrupt
    handle = blocks(hf)[1].register_forward_hook(boom)
    try:
        with pytest.raises(KeyboardInterrupt):
            with torch.no_grad():
                with lm.trace(A):
                    with torch.enable_grad():
                        h = first(layers[0].output)
                        x = first(layers[2].output)
    finally:
        handle.remove()
    assert all_hooks(hf) == 0
    assert torch.is_grad_enabled()


def test_bare_except_around_a_read_that_needs_a_second_pass(lm, hf):
    _, a = block_outputs(hf, A)

    def put(h):
        h[:, -1] = a[2][:, -1]
        return h
    ref, _ = block_outputs(hf, B, {0: put})
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(A):
            late = first(layers[2].output)[:, -1]
        with tracer.invoke(B):
            try:
                first(layers[0].output)[:, -1] = late
            except:  # noqa: E722 - the pattern under test
                raise
            out = lm.output.logits.save()
    assert close(out, ref)
    assert all_hooks(hf) == 0

