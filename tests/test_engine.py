"""The engine against hand-written plain-PyTorch hook references on the same weights."""
import os
import pathlib

import pytest
import torch

import nnpatch
from conftest import all_hooks, block_envoys, blocks, hooked_forward, ids, prompt

A = prompt(3, 5, 7, 9, 11, 13)
B = prompt(4, 6, 8, 10, 12, 14)
SHORT = prompt(20, 21, 22)


def run_with_hooks(hf, text, patches=None, record=()):
    """Plain forward with forward hooks: patches {layer: fn(hidden) -> hidden}, records block outputs."""
    patches = patches or {}
    seen = {}

    def hook_for(i):
        def hook(m, args, out):
            if i in patches:
                out = patches[i](out.clone())
            seen[i] = out.clone()
            return out
        return hook
    return hooked_forward(hf, text, [(b, hook_for(i)) for i, b in enumerate(blocks(hf))]), seen


def close(a, b, tol=1e-5):
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=tol, rtol=tol)


def test_reads_equal_hook_reference(lm, hf):
    ref_logits, ref = run_with_hooks(hf, A)
    layers = block_envoys(lm)
    with lm.trace(A):
        hidden = [layers[i].output.save() for i in range(3)]
        logits = lm.output.logits.save()
    for i in range(3):
        assert close(hidden[i], ref[i])
    assert close(logits, ref_logits)
    assert all_hooks(hf) == 0


def test_output_assignment_and_inplace_edit(lm, hf):
    v = torch.randn(hf.config.hidden_size if hasattr(hf.config, "hidden_size") else 32)

    def patch(h):
        h[:, 2] = v
        return h * 2

    ref_logits, _ = run_with_hooks(hf, A, {1: patch})
    layers = block_envoys(lm)
    with lm.trace(A):
        h = layers[1].output
        h[:, 2] = v                     # in place
        layers[1].output = h * 2        # assignment
        logits = lm.output.logits.save()
    assert close(logits, ref_logits)


def test_input_read_and_write(lm, hf):
    # Editing a block's input must not leak into the residual the block adds back: compare
    # against a pre-hook that replaces the input argument.
    layer = blocks(hf)[2]
    captured = {}

    def pre(m, args):
        captured["x"] = args[0].clone()
        x = args[0].clone()
        x[:, -1] = 0
        return (x,) + args[1:]

    h = layer.register_forward_pre_hook(pre)
    with torch.no_grad():
        ref = hf(ids(A)).logits
    h.remove()
    with lm.trace(A):
        x = block_envoys(lm)[2].input
        seen = x.clone().save()
        x[:, -1] = 0
        logits = lm.output.logits.save()
    assert close(seen, captured["x"])
    assert close(logits, ref)


def test_multi_invoke_patching_equals_unbatched_runs(lm, hf):
    _, clean = run_with_hooks(hf, A)
    ref_logits, _ = run_with_hooks(hf, B, {1: lambda h: torch.cat([h[:, :3], clean[1][:, 3:]], 1)})
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(A):
            clean_h = layers[1].output[:, 3:]
        with tracer.invoke(B):
            layers[1].output[:, 3:] = clean_h
            patched = lm.output.logits.save()
    assert close(patched, ref_logits)


def test_padding_each_invoke_sees_its_own_tokens(lm, hf):
    ref_long, seen_long = run_with_hooks(hf, A)
    ref_short, seen_short = run_with_hooks(hf, SHORT)
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(SHORT):
            short_h = layers[0].output.save()
            short_logits = lm.output.logits.save()
            fourth = layers[0].output[:, 2].save()
        with tracer.invoke(A):
            long_logits = lm.output.logits.save()
    assert short_h.shape[1] == 3  # exactly its own tokens
    assert close(short_h, seen_short[0], 1e-4)
    assert close(fourth, seen_short[0][:, 2], 1e-4)
    assert close(short_logits, ref_short, 1e-4)
    assert close(long_logits, ref_long, 1e-4)


def test_consumer_written_before_producer(lm, hf):
    _, clean = run_with_hooks(hf, A)
    ref, _ = run_with_hooks(hf, B, {2: lambda h: clean[2]})
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(B):
            layers[2].output = clean_h    # noqa: F821 - assigned by the next invoke
            patched = lm.output.logits.save()
        with tracer.invoke(A):
            clean_h = layers[2].output
    assert close(patched, ref)


def test_right_side_evaluated_before_module_is_reached(lm, hf):
    _, clean = run_with_hooks(hf, A)
    ref, _ = run_with_hooks(hf, B, {0: lambda h: clean[0]})
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(A):
            clean_h = layers[0].output
        with tracer.invoke(B):
            layers[0].output[:] = clean_h
            patched = lm.output.logits.save()
    assert close(patched, ref)


def test_chain_over_three_invokes(lm, hf):
    # A -> B at layer 0, B (patched) -> C at layer 2.
    _, a = run_with_hooks(hf, A)
    _, b = run_with_hooks(hf, B, {0: lambda h: a[0]})
    ref, _ = run_with_hooks(hf, SHORT + " t1 t2 t3", {2: lambda h: b[2]})
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(SHORT + " t1 t2 t3"):
            layers[2].output = from_b  # noqa: F821
            c_logits = lm.output.logits.save()
        with tracer.invoke(B):
            layers[0].output = from_a  # noqa: F821
            from_b = layers[2].output
        with tracer.invoke(A):
            from_a = layers[0].output
    assert close(c_logits, ref, 1e-4)


def test_value_from_a_later_layer_into_an_earlier_one(lm, hf):
    # Patchscopes: B needs at layer 0 what A computes at layer 2. One pass cannot do it; nnpatch
    # runs B again once A's value exists.
    _, a = run_with_hooks(hf, A)

    def put(h):
        h[:, -1] = a[2][:, -1]
        return h

    ref, _ = run_with_hooks(hf, B, {0: put})
    layers = block_envoys(lm)
    log = []
    with lm.trace() as tracer:
        with tracer.invoke(A):
            late = layers[2].output[:, -1]
        with tracer.invoke(B):
            layers[0].output[:, -1] = late
            scoped = lm.output.logits.save()
    assert close(scoped, ref)
    assert all_hooks(hf) == 0
    del log


def test_trace_level_statements_after_invokes_see_results(lm, hf):
    ref_a, _ = run_with_hooks(hf, A)
    ref_b, _ = run_with_hooks(hf, B)
    results = {}
    with lm.trace() as tracer:
        with tracer.invoke(A):
            la = lm.output.logits[0, -1]
        with tracer.invoke(B):
            lb = lm.output.logits[0, -1]
        results["diff"] = (la - lb).sum().item().save()
        summary = {"a": la.argmax().item()}.save()
    assert results["diff"] == pytest.approx(float((ref_a[0, -1] - ref_b[0, -1]).sum()), abs=1e-4)
    assert summary["a"] == int(ref_a[0, -1].argmax())


def test_barriers_are_accepted_and_change_nothing(lm, hf):
    layers = block_envoys(lm)

    def program(use_barrier):
        with lm.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(A):
                h = layers[1].output
                if use_barrier:
                    barrier()
            with tracer.invoke(B):
                if use_barrier:
                    barrier()
                layers[1].output = h
                out = lm.output.logits.save()
        return out

    assert close(program(True), program(False), 0)


def test_variables_land_in_the_enclosing_function(lm):
    def f():
        with lm.trace(A):
            x = block_envoys(lm)[0].output.sum().item()
        return x

    assert isinstance(f(), float)


def test_save_works_on_any_value(lm):
    with lm.trace(A):
        n = block_envoys(lm)[0].output.shape[1].save()
        d = dict(a=1).save()
        lst = [1, 2].save()
        f = block_envoys(lm)[0].output.mean().item().save()
    assert n == 6 and d == {"a": 1} and lst == [1, 2] and isinstance(f, float)


def test_generic_module_and_tuple_outputs():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return y, y * 2

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.head = torch.nn.Linear(4, 1)

        def forward(self, x):
            a, b = self.pair(x)
            return self.head(a + b)

    torch.manual_seed(0)
    net = Net()
    x1, x2 = torch.randn(2, 4), torch.randn(3, 4)
    with torch.no_grad():
        a1, _ = net.pair(x1)
        ref = net.head(a1[:1] * 0 + a1[:1] + 2 * net.pair.lin(x2)[:1])  # row 0 of x2 run with a = a1[0]
    model = nnpatch.Model(net)
    with model.trace() as tracer:
        with tracer.invoke(x1):
            first = model.pair.output[0]
        with tracer.invoke(x2):
            model.pair.output[0][:1] = first[:1]
            out = model.output.save()
    assert close(out[:1], ref)
    assert out.shape == (3, 1)


def test_out_of_order_read_names_both_modules(lm, hf):
    layers = block_envoys(lm)
    with pytest.raises(nnpatch.NNPatchError) as e:
        with lm.trace(A):
            late = layers[2].output
            early = layers[0].output  # noqa: F841
    msg = str(e.value)
    assert ".2.output" in msg and ".0.output" in msg
    assert all_hooks(hf) == 0


def test_wrong_module_name_lists_closest(lm):
    with pytest.raises(AttributeError) as e:
        with lm.trace(A):
            lm.lm_heda.output
    assert "lm_head" in str(e.value)


def test_wrong_patch_shape_names_path_and_shapes(lm, hf):
    layers = block_envoys(lm)
    with pytest.raises(nnpatch.NNPatchError) as e:
        with lm.trace(A):
            layers[1].output = torch.zeros(1, 2, 5)
    msg = str(e.value)
    assert ".1.output" in msg and "(1, 2, 5)" in msg and "(1, 6, 32)" in msg
    assert all_hooks(hf) == 0


def test_errors_show_the_users_line_not_engine_frames(lm):
    import traceback
    with pytest.raises(ZeroDivisionError) as e:
        with lm.trace(A):
            h = block_envoys(lm)[1].output
            1 / 0  # the user's own mistake
    frames = traceback.extract_tb(e.value.__traceback__)
    assert any(f.line.strip().startswith("1 / 0") for f in frames)
    package = str(pathlib.Path(nnpatch.__file__).parent) + os.sep  # not a clone's folder named nnpatch
    inner = [f for f in frames if f.filename.startswith(package)]
    assert [f.name for f in inner] == ["__enter__"]  # the re-raise; nothing from inside the model


def test_uncaught_trace_errors_in_a_script_show_no_engine_frame(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "script.py"
    script.write_text(
        "import torch, nnpatch\n"
        "model = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()))\n"
        "with model.trace(torch.ones(1, 3)):\n"
        "    h = model[0].output\n"
        "    h / undefined_name\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "NameError" in run.stderr and "h / undefined_name" in run.stderr
    assert "nnpatch" not in run.stderr.replace("import torch, nnpatch", ""), run.stderr


def test_model_unchanged_after_error_and_interrupt(lm, hf):
    with torch.no_grad():
        before = hf(ids(A)).logits
    layers = block_envoys(lm)
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with lm.trace() as tracer:
                with tracer.invoke(A):
                    layers[0].output[:] = 0
                    layers[1].output
                    raise exc("stop")
        assert all_hooks(hf) == 0
        with torch.no_grad():
            assert torch.equal(hf(ids(A)).logits, before)


def test_reading_outside_an_invoke_is_a_clear_error(lm):
    with pytest.raises(nnpatch.NNPatchError, match="only inside an invoke"):
        block_envoys(lm)[0].output


def test_trace_from_exec_of_a_compiled_string(lm):
    from nnpatch.engine import compile_source
    src = "with lm.trace(A):\n    h = lm.lm_head.output.save()\n"
    ns = {"lm": lm, "A": A}
    exec(compile_source(src, "<test-exec>"), ns)
    assert ns["h"].shape[:2] == (1, 6)
    with pytest.raises(nnpatch.NNPatchError, match="has none"):
        exec(compile(src, "<no-source>", "exec"), dict(ns))


def test_trace_in_an_ipython_cell(lm):
    from IPython.testing.globalipapp import get_ipython
    ip = get_ipython()
    ip.user_ns.update(lm=lm, A=A)
    result = ip.run_cell("with lm.trace(A):\n    cell_h = lm.lm_head.output.save()\n")
    assert result.success, result.error_in_exec
    assert ip.user_ns["cell_h"].shape[:2] == (1, 6)


def test_reading_another_invokes_rows_by_module(lm, hf):
    _, clean = run_with_hooks(hf, A)
    ref, _ = run_with_hooks(hf, B, {1: lambda h: torch.cat([h[:, :5], clean[1][:, 5:]], 1)})
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(A) as clean_run:
            pass
        with tracer.invoke(B):
            other = lm.of(clean_run)
            layers[1].output[:, 5] = block_envoys(other)[1].output[:, 5]
            patched = lm.output.logits.save()
    assert close(patched, ref)
    with lm.trace() as tracer:                                   # the source invoke written later
        with tracer.invoke(B):
            layers[1].output[:, 5] = block_envoys(lm.of(clean_run))[1].output[:, 5]
            patched_first = lm.output.logits.save()
        with tracer.invoke(A) as clean_run:
            pass
    assert close(patched_first, ref)
    with pytest.raises(nnpatch.NNPatchError, match="read-only"):
        with lm.trace() as tracer:
            with tracer.invoke(A) as clean_run:
                pass
            with tracer.invoke(B):
                block_envoys(lm.of(clean_run))[1].output = 0


def test_prompt_lists_token_ids_and_tokenizer_outputs(lm, hf, tok):
    ref_a, seen_a = run_with_hooks(hf, A)
    ref_s, seen_s = run_with_hooks(hf, SHORT)
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke([SHORT, A]):                          # two prompts, one invoke
            both = layers[1].output.save()
            both_logits = lm.output.logits.save()
        with tracer.invoke(tok(SHORT, return_tensors="pt")):     # a tokenizer output
            enc = lm.output.logits.save()
        with tracer.invoke(ids(A)[0]):                           # a 1-D id tensor
            raw = lm.output.logits.save()
    assert both.shape[:2] == (2, 6)                              # padded to its own longest prompt
    assert close(both[1], seen_a[1][0], 1e-4) and close(both[0, 3:], seen_s[1][0], 1e-4)
    assert close(both_logits[0, -1], ref_s[0, -1], 1e-4)
    assert close(enc, ref_s, 1e-4) and close(raw, ref_a, 1e-4)
