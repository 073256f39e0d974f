"""Ordinary Python in a trace body: in a function, a method, a module and a notebook cell.

Each value is checked against a plain forward with hooks on the same weights.
"""
import sys
import textwrap

import pytest
import torch

import nnpatch
from conftest import all_hooks, block_envoys, block_outputs, close, first, prompt

A = prompt(1, 2, 3, 4, 5, 6)
B = prompt(1, 2, 9, 4, 5, 6)










def test_body_that_starts_with_try(lm, hf):
    layers = block_envoys(lm)
    with lm.trace(A):
        try:
            h = first(layers[1].output).save()
        except ValueError:
            h = None
    assert close(h, block_outputs(hf, A)[1][1])


def test_try_around_a_failing_read_inside_the_body(lm, hf):
    layers = block_envoys(lm)
    with lm.trace(A):
        try:
            lm.no_such_module.output
        except AttributeError as e:
            caught = str(e)
        h = first(layers[0].output).save()
    assert "no_such_module" in caught and close(h, block_outputs(hf, A)[1][0])


def test_body_of_only_pass(lm, hf):
    with lm.trace(A):
        pass
    with lm.trace() as tracer:
        with tracer.invoke(A):
            pass
    assert all_hooks(hf) == 0


def test_global_declared_in_the_enclosing_function(lm, hf):
    global GLOBAL_H

    def f():
        global GLOBAL_H
        with lm.trace(A):
            GLOBAL_H = first(block_envoys(lm)[2].output).save()
    f()
    assert close(GLOBAL_H, block_outputs(hf, A)[1][2])
    del GLOBAL_H


def test_global_declared_in_the_body(lm, hf):
    def f():
        with lm.trace(A):
            global BODY_GLOBAL
            BODY_GLOBAL = first(block_envoys(lm)[0].output).save()
    f()
    assert close(globals()["BODY_GLOBAL"], block_outputs(hf, A)[1][0])
    del globals()["BODY_GLOBAL"]


class Probe:
    def __init__(self, lm):
        self.lm = lm
        self.__hidden = None

    def run(self, text):
        with self.lm.trace(text):
            self.__hidden = first(block_envoys(self.lm)[1].output).save()
            __local = self.__hidden * 2
            doubled = __local.save()
        return self.__hidden, doubled


def test_name_mangled_attributes_in_a_method(lm, hf):
    hidden, doubled = Probe(lm).run(A)
    want = block_outputs(hf, A)[1][1]
    assert close(hidden, want) and close(doubled, 2 * want)


def test_comprehensions_lambdas_and_nested_functions_read_other_invokes(lm, hf):
    _, a = block_outputs(hf, A)
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(A):
            clean = [first(layers[i].output)[:, -1] for i in range(3)]
        with tracer.invoke(B):
            norms = [c.norm() for c in clean]
            scale = lambda k: clean[k] * 2  # noqa: E731
            doubled = scale(1)

            def total():
                return sum(c.sum() for c in clean)
            summed = total()
    assert close(torch.stack(norms), torch.stack([a[i][:, -1].norm() for i in range(3)]))
    assert close(doubled, 2 * a[1][:, -1])
    assert close(summed, sum(a[i][:, -1].sum() for i in range(3)))


def test_trace_inside_loops_and_functions_with_control_flow(lm, hf):
    _, a = block_outputs(hf, A)
    layers = block_envoys(lm)

    def first_layer_with_positive_mean():
        for i in range(3):
            with lm.trace(A):
                h = first(layers[i].output)
                mean = h.mean().item().save()
            if mean > -1e9:
                return i, mean
        return None

    i, mean = first_layer_with_positive_mean()
    assert i == 0 and mean == pytest.approx(float(a[0].mean()), abs=1e-5)
    seen = []
    for i in range(3):
        if i == 1:
            continue
        with lm.trace(A):
            seen.append(first(layers[i].output).mean().item())
        if i == 2:
            break
    assert seen == pytest.approx([float(a[0].mean()), float(a[2].mean())], abs=1e-5)


def test_a_file_edited_after_import_runs_the_loaded_code_or_is_refused(tmp_path, lm, monkeypatch):
    import importlib
    import linecache
    original = textwrap.dedent("""
        def run(lm):
            with lm.trace("t1 t2 t3"):
                h = lm.lm_head.output.save()
            return h


        def other(lm):
            with lm.trace("t1 t2 t3"):
                h = lm.lm_head.output.save()
            return h
    """)
    edited = original.replace("h = lm.lm_head.output.save()", "h = lm.lm_head.output.save()\n        h = None")
    module = tmp_path / "edited_probe.py"
    module.write_text(original)
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("edited_probe")
    try:
        assert probe.run(lm).shape[:2] == (1, 3)
        module.write_text(edited)
        linecache.checkcache(str(module))
        assert probe.run(lm).shape[:2] == (1, 3)  # traced before the edit: the loaded code runs
        with pytest.raises(nnpatch.NNPatchError, match="changed since it was loaded"):
            probe.other(lm)  # first traced after the edit: its new text is refused
    finally:
        sys.modules.pop("edited_probe", None)


def test_a_tracer_set_before_the_trace_keeps_tracing_after_it(lm):
    lines = []

    def tracer(frame, event, arg):
        if frame.f_code.co_name == "traced_function":
            lines.append(frame.f_lineno)
        return tracer

    def traced_function():
        x = 1
        with lm.trace(A):
            lm.lm_head.output.save()
        y = 2
        return x + y

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        traced_function()
    finally:
        sys.settrace(previous)
    last = traced_function.__code__.co_firstlineno + 5  # `return x + y`
    assert last in lines
