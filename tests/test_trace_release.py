"""A finished trace frees what it computed as soon as nothing of the user's holds it.

The engine's objects point at each other (a trace and its invokes, an invoke and the forward
passes it ran in, a namespace and its invoke); left as they are after the trace, those cycles
would keep every batched value, every view handed out and the inputs alive until Python's cyclic
garbage collector happens to run: memory (on a GPU, GPU memory) held across traces, and collector
work that grows with it. These tests run with the collector off: what a trace held must be freed
by reference counting alone, in a plain trace, a multi-invoke patching trace, a generation, and a
trace left by `return`; and what the user keeps (variables, functions defined in the body) still
works.
"""
import gc
import sys
import weakref

import pytest
import torch

from conftest import all_hooks, block_envoys, block_outputs, close, first, prompt

A = prompt(1, 2, 3, 4, 5, 6)
B = prompt(1, 2, 9, 4, 5, 6)


@pytest.fixture
def no_collector():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _refs(*tensors):
    """Weak references to the tensors and the batched tensors they are views of."""
    return [weakref.ref(x) for t in tensors for x in (t, t._base) if x is not None]


def test_a_trace_frees_its_values_once_the_caller_lets_go(lm, hf, no_collector):
    layers = block_envoys(lm)

    def run():
        with lm.trace(A):
            h = first(layers[0].output)
            logits = lm.output.logits
        return _refs(h, logits), float(logits[0, -1].max().detach())

    held, top = run()
    assert held and [r() for r in held] == [None] * len(held)
    assert top == float(hf(torch.tensor([lm.to_tokens(A)])).logits[0, -1].max().detach())
    assert all_hooks(hf) == 0


def test_a_patching_trace_frees_both_invokes_values(lm, hf, no_collector):
    layers = block_envoys(lm)

    def run():
        with lm.trace() as tracer:
            with tracer.invoke(A):
                clean = first(layers[1].output)
            with tracer.invoke(B):
                first(layers[1].output)[:, -1] = clean[:, -1]
                patched = lm.output.logits
        return _refs(clean, patched), patched.detach().clone()

    held, patched = run()
    assert held and [r() for r in held] == [None] * len(held)
    _, clean_ref = block_outputs(hf, A)

    def patch(h):
        h[:, -1] = clean_ref[1][:, -1]
        return h
    reference, _ = block_outputs(hf, B, {1: patch})
    assert close(patched, reference)


def test_a_generation_frees_its_steps_values(lm, hf, no_collector):
    layers = block_envoys(lm)

    def run():
        with lm.generate(A, max_new_tokens=3, do_sample=False) as tracer:
            hidden = []
            for step in tracer.all():
                hidden.append(first(layers[1].output))
            ids = lm.generator.output
        return _refs(*hidden, ids)

    held = run()
    assert held and [r() for r in held] == [None] * len(held)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="leaving a trace body needs Python 3.11")
def test_a_trace_left_by_return_frees_its_values(lm, hf, no_collector):
    layers = block_envoys(lm)
    held = []

    def run():
        with lm.trace(A):
            h = first(layers[0].output)
            held.extend(_refs(h))
            return h.detach().clone()

    got = run()
    assert held and [r() for r in held] == [None] * len(held)
    assert close(got, block_outputs(hf, A)[1][0])


def test_what_the_user_keeps_still_works_after_the_release(lm, hf, no_collector):
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(A):
            h = first(layers[0].output)
            shape_of_h = lambda: tuple(h.shape)  # noqa: E731 - a function defined in the body
        with tracer.invoke(B):
            g = first(layers[0].output)
            plus = lambda: (g + h).sum()  # noqa: E731 - uses another invoke's variable
    assert shape_of_h() == tuple(h.shape)
    torch.testing.assert_close(plus(), (g + h).sum())
