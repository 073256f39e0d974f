"""`return`, `break` and `continue` that leave a trace body, as they would leave any with-block.

Every value is checked against a plain forward with hooks on the same weights, and every
side effect is counted: statements after the leaving one never run, statements before it run
once, and the caller's `finally` blocks and loop `else` clauses behave as Python says.
"""
import sys
import textwrap

import pytest
import torch

import nnpatch
from conftest import all_hooks, block_envoys, block_outputs, close, first, prompt

A = prompt(1, 2, 3, 4, 5, 6)
B = prompt(1, 2, 9, 4, 5, 6)
ONE = prompt(7)

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="leaving a body needs Python 3.11")


def run(src: str, name: str, *args):
    """Define `name` from source (registered with linecache, as a file's code is) and call it."""
    ns = {"first": first, "torch": torch}
    exec(nnpatch.engine.compile_source(textwrap.dedent(src), f"<leave-{name}>"), ns)
    return ns[name](*args)


def test_return_from_a_function_gives_the_body_value(lm, hf):
    layers = block_envoys(lm)
    log = []

    def read(text, i):
        with lm.trace(text):
            h = first(layers[i].output).save()
            log.append(i)
            return h
        log.append("never")  # noqa: unreachable for Python, which cannot know the body ran

    for text in (A, ONE):
        for i in range(3):
            assert close(read(text, i), block_outputs(hf, text)[1][i])
    assert log == [0, 1, 2, 0, 1, 2] and all_hooks(hf) == 0


def test_return_depends_on_a_value_the_model_computed(lm, hf):
    _, outs = block_outputs(hf, A)
    threshold = float(first(outs[1]).mean())
    layers = block_envoys(lm)
    after = []

    def sign(limit):
        with lm.trace(A):
            m = first(layers[1].output).mean().item().save()
            if m > limit:
                return "above", m
            after.append(m)
        return "not above", m

    assert sign(threshold - 1)[0] == "above" and after == []
    label, m = sign(threshold + 1)
    assert label == "not above" and after == [m] and m == pytest.approx(threshold, abs=1e-5)


def test_bare_return_and_return_of_a_tuple(lm, hf):
    layers = block_envoys(lm)
    got = {}

    def store():
        with lm.trace(B):
            got["h"] = first(layers[2].output).save()
            return
        got["h"] = None

    def pair():
        with lm.trace(B):
            a = first(layers[0].output).save()
            b = lm.lm_head.output.save()
            return a, b[:, -1]

    assert store() is None and close(got["h"], block_outputs(hf, B)[1][2])
    logits, outs = block_outputs(hf, B)
    a, last = pair()
    assert close(a, outs[0]) and close(last, logits[:, -1])


def test_break_and_continue_in_a_loop_around_the_trace(lm, hf):
    layers = block_envoys(lm)
    events, means = [], []
    for i in range(3):
        with lm.trace(A):
            h = first(layers[i].output).save()
            means.append(h.mean().item())
            if i == 0:
                continue
            events.append(("rest of body", i))
            if i == 1:
                break
            events.append("never")
        events.append(("after block", i))
    else:
        events.append("loop else")
    _, outs = block_outputs(hf, A)
    assert events == [("rest of body", 1)] and i == 1
    assert means == pytest.approx([float(outs[0].mean()), float(outs[1].mean())], abs=1e-5)
    assert close(h, outs[1]) and all_hooks(hf) == 0


def test_while_loop_and_finally_blocks_of_the_caller(lm, hf):
    layers = block_envoys(lm)
    log = []

    def walk():
        n = 0
        try:
            while n < 3:
                n += 1
                try:
                    with lm.trace(ONE):
                        h = first(layers[n - 1].output).save()
                        if n == 2:
                            break
                        log.append(("body", n))
                        continue
                finally:
                    log.append(("finally", n))
            return n, h
        finally:
            log.append("outer finally")

    n, h = walk()
    assert n == 2 and close(h, block_outputs(hf, ONE)[1][1])
    assert log == [("body", 1), ("finally", 1), ("finally", 2), "outer finally"]


def test_return_inside_a_while_loop_in_the_body(lm, hf):
    layers = block_envoys(lm)

    def deepest_below(limit):
        with lm.trace(A):
            i, found = 0, None
            while i < 3:
                m = first(layers[i].output).abs().max().item()
                if m > limit:
                    found = i
                    return found
                i += 1
        return None

    _, outs = block_outputs(hf, A)
    peaks = [float(outs[i].abs().max()) for i in range(3)]
    assert deepest_below(-1.0) == 0
    assert deepest_below(peaks[0] + 1e-3) == next((i for i, p in enumerate(peaks) if p > peaks[0] + 1e-3), None)


def test_trace_level_return_after_invokes_runs_them_first(lm, hf):
    """With invoke blocks, a trace-level `return` comes after the invokes written before it, so
    the patched run has happened when the caller evaluates the return value."""
    layers = block_envoys(lm)

    def patch():
        with lm.trace() as tracer:
            with tracer.invoke(A):
                clean = layers[1].output
            with tracer.invoke(B):
                layers[1].output = clean
                patched = lm.lm_head.output.save()
            return patched

    clean = block_outputs(hf, A)[1][1]
    reference, _ = block_outputs(hf, B, edits={1: lambda h: clean.clone()})
    assert close(patch(), reference) and all_hooks(hf) == 0


def test_method_with_private_names_and_a_module_level_loop(lm, hf):
    class Probe:
        def __init__(self, model):
            self.__model = model

        def run(self, i):
            with self.__model.trace(A):
                h = first(block_envoys(self.__model)[i].output).save()
                return h

    assert close(Probe(lm).run(2), block_outputs(hf, A)[1][2])
    # a module (or notebook cell) body: no function around the loop
    src = """
        seen = []
        for i in range(3):
            with lm.trace(TEXT):
                h = first(block_envoys(lm)[i].output).save()
                seen.append(i)
                if i == 1:
                    break
    """
    ns = {"lm": lm, "TEXT": A, "first": first, "block_envoys": block_envoys}
    exec(nnpatch.engine.compile_source(textwrap.dedent(src), "<leave-module>"), ns)
    assert ns["seen"] == [0, 1] and close(ns["h"], block_outputs(hf, A)[1][1])


def test_a_debugger_or_coverage_tracer_keeps_running(lm):
    layers = block_envoys(lm)
    lines = []

    def tracer(frame, event, arg):
        if frame.f_code.co_name == "leaves":
            lines.append((event, frame.f_lineno))
        return tracer

    def leaves():
        with lm.trace(A):
            h = layers[0].output.save()
            return h
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        h = leaves()
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)
    assert isinstance(h, torch.Tensor) and lines[0][0] == "call" and lines[-1][0] == "return"


def test_leaving_does_not_change_grad_mode_and_leaves_no_hooks(lm, hf):
    layers = block_envoys(lm)

    def leave():
        with lm.trace(A):
            with torch.no_grad():
                h = first(layers[0].output).save()
            return h

    with torch.no_grad():
        leave()
        assert not torch.is_grad_enabled()
    leave()
    assert torch.is_grad_enabled() and all_hooks(hf) == 0


@pytest.mark.parametrize("body, words", [
    ("for i in range(2):\n    h = layers[i].output\n    return h", ["return", "`for` loop"]),
    ("with torch.no_grad():\n    h = layers[0].output\n    break", ["break", "`with` block"]),
    ("try:\n    h = layers[0].output\n    continue\nfinally:\n    pass", ["continue", "`finally`"]),
    ("try:\n    h = layers[0].output\nexcept ValueError:\n    break", ["break", "`except` clause"]),
    ("h = layers[0].output\nif h is not None: break", ["break", "line of its own"]),
    ("h = 1; continue", ["continue", "line of its own"]),
    ("return lm.lm_head.output.save()", ["`value = lm.lm_head.output.save()`", "return value"]),
    ("return layers[0].output", ["`value = layers[0].output`", ".output"]),
])
def test_leaves_nnpatch_cannot_run_are_clear_errors(lm, hf, body, words):
    src = "def f(lm, layers):\n    for _ in range(1):\n        with lm.trace(TEXT):\n" + \
        textwrap.indent(body, " " * 12) + "\n"
    ns = {"TEXT": A, "torch": torch}
    exec(nnpatch.engine.compile_source(src, "<leave-error>"), ns)
    with pytest.raises(nnpatch.NNPatchError) as info:
        ns["f"](lm, block_envoys(lm))
    message = str(info.value)
    assert "<leave-error>:" in message and all(w in message for w in words), message
    assert all_hooks(hf) == 0 and sys.gettrace() is None


def test_leaving_from_an_invoke_block_or_an_edit_is_a_clear_error(lm, hf):
    src = """
        def f(lm, layers):
            for _ in range(1):
                with lm.trace() as tracer:
                    with tracer.invoke(TEXT):
                        h = layers[0].output
                        break

        def g(lm, layers):
            for _ in range(1):
                with lm.edit() as edited:
                    layers[0].output = layers[0].output * 2
                    break
    """
    ns = {"TEXT": A}
    exec(nnpatch.engine.compile_source(textwrap.dedent(src), "<leave-invoke>"), ns)
    with pytest.raises(nnpatch.NNPatchError, match="invoke block"):
        ns["f"](lm, block_envoys(lm))
    with pytest.raises(nnpatch.NNPatchError, match="edit's body"):
        ns["g"](lm, block_envoys(lm))
    assert all_hooks(hf) == 0
