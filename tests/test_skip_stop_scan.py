"""module.skip(value), tracer.stop() and model.scan(...) against plain forward hooks on the same
weights; the model exactly as before after every error."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import nnpatch
from conftest import all_hooks, block_envoys, blocks, close, first, gpt2, ids, llama, prompt, word_tokenizer


@pytest.fixture(params=["gpt2", "llama"])
def hf(request):
    return {"gpt2": gpt2, "llama": llama}[request.param]()


@pytest.fixture
def lm(hf):
    return nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())


def untouched(hf):
    """No hook (module-level or process-wide) and no instance-level forward left behind."""
    return (all_hooks(hf) == 0 and not any("forward" in m.__dict__ for m in hf.modules())
            and not torch.nn.modules.module._global_forward_hooks)


def logits_with(hf, text, replace):
    """Logits with `replace[i](block input) -> block output` in place of block i's output."""
    handles = []
    for i, block in enumerate(blocks(hf)):
        if i in replace:
            handles.append(block.register_forward_hook(lambda m, a, o, i=i: replace[i](a[0])))
    try:
        with torch.no_grad():
            return hf(ids(text)).logits
    finally:
        for h in handles:
            h.remove()


# -- skip -------------------------------------------------------------------------------------------

def test_skip_a_block_with_its_input(lm, hf):
    text = prompt(3, 4, 5, 6)
    ran = []
    inner = blocks(hf)[1].mlp
    handle = inner.register_forward_hook(lambda m, a, o: ran.append(isinstance(o, FakeTensor)))
    try:
        with lm.trace(text):
            block_envoys(lm)[1].skip(block_envoys(lm)[1].input)
            got = lm.output.logits.save()
    finally:
        handle.remove()
    want = logits_with(hf, text, {1: lambda x: x})
    assert close(got, want)
    assert all(ran), "the skipped block's MLP ran on real tensors"  # only the fake-tensor shape probe
    assert untouched(hf)


def test_skip_with_a_value_read_earlier_and_a_one_token_prompt(lm, hf):
    text = prompt(7)
    with lm.trace(text):
        h0 = block_envoys(lm)[0].output
        block_envoys(lm)[2].skip(h0 * 2)
        got = lm.output.logits.save()
    outs = {}
    handles = [blocks(hf)[0].register_forward_hook(lambda m, a, o: outs.__setitem__(0, first(o).clone())),
               blocks(hf)[2].register_forward_hook(lambda m, a, o: outs[0] * 2)]
    try:
        with torch.no_grad():
            want = hf(ids(text)).logits
    finally:
        for h in handles:
            h.remove()
    assert close(got, want)


def test_skip_in_one_invoke_leaves_the_other_invokes_rows_alone(lm, hf):
    a, b = prompt(3, 4, 5), prompt(3, 4, 5)  # equal prompts: only the skip tells them apart
    with lm.trace() as tracer:
        with tracer.invoke(a):
            block_envoys(lm)[1].skip(block_envoys(lm)[1].input)
            got_a = lm.output.logits.save()
        with tracer.invoke(b):
            got_b = lm.output.logits.save()
    want_a = logits_with(hf, a, {1: lambda x: x})
    with torch.no_grad():
        want_b = hf(ids(b)).logits
    assert close(got_a, want_a) and close(got_b, want_b) and not close(got_a, got_b)
    assert untouched(hf)


def test_skip_with_a_wrong_shaped_value_is_a_clear_error(lm, hf):
    for bad in (torch.zeros(1, 3, 7), torch.zeros(2, 3, 32), (torch.zeros(1, 3, 32), torch.zeros(1))):
        with pytest.raises(ValueError, match=r"cannot skip .*layers?\.1|cannot skip .*h\.1") as info:
            with lm.trace(prompt(1, 2, 3)):
                block_envoys(lm)[1].skip(bad)
                lm.output.logits.save()
        assert "(1, 3, 32)" in str(info.value)
        assert untouched(hf)
    with pytest.raises(ValueError, match="cannot skip"):  # the same check with another invoke beside it
        with lm.trace() as tracer:
            with tracer.invoke(prompt(1, 2, 3)):
                block_envoys(lm)[1].skip(torch.zeros(1, 3, 5))
            with tracer.invoke(prompt(4, 5, 6)):
                lm.output.logits.save()
    assert untouched(hf)
    with torch.no_grad():  # and the model computes as before
        assert close(hf(ids(prompt(1, 2))).logits, hf(ids(prompt(1, 2))).logits)


def test_skip_too_late_is_an_error(lm, hf):
    with pytest.raises(nnpatch.NNPatchError, match="already run"):
        with lm.trace(prompt(1, 2, 3)):
            block_envoys(lm)[1].output.sum()
            block_envoys(lm)[0].skip(torch.zeros(1, 3, 32))
    with pytest.raises(nnpatch.NNPatchError, match="was already running"):
        with lm.trace(prompt(1, 2, 3)):
            block_envoys(lm)[1].mlp.output.sum()  # block 1 is running
            block_envoys(lm)[1].skip(torch.zeros(1, 3, 32))
    with pytest.raises(nnpatch.NNPatchError, match="whole model"):
        with lm.trace(prompt(1, 2, 3)):
            lm.skip(1)
    assert untouched(hf)


# -- stop -------------------------------------------------------------------------------------------

def test_stop_ends_the_forward_after_the_last_value_needed(lm, hf):
    text = prompt(3, 4, 5)
    ran = []
    handle = blocks(hf)[2].register_forward_hook(lambda *a: ran.append(2))
    after = "not run"
    try:
        with lm.trace(text) as tracer:
            h1 = block_envoys(lm)[1].output.save()
            tracer.stop()
            after = "ran"  # noqa: F841 - must not run
    finally:
        handle.remove()
    assert ran == [] and after == "not run"
    outs = {}
    handle = blocks(hf)[1].register_forward_hook(lambda m, a, o: outs.__setitem__(1, first(o).clone()))
    with torch.no_grad():
        hf(ids(text))
    handle.remove()
    assert close(h1, outs[1]) and untouched(hf)


def test_stop_waits_for_the_other_invokes(lm, hf):
    ran = []
    handle = hf.lm_head.register_forward_hook(lambda *a: ran.append(1))
    try:
        with lm.trace() as tracer:
            with tracer.invoke(prompt(3, 4)):
                early = block_envoys(lm)[0].output.save()
                tracer.stop()
            with tracer.invoke(prompt(5, 6)):
                late = block_envoys(lm)[2].output.save()
    finally:
        handle.remove()
    assert ran == []  # everything after the last needed block was cut off
    outs = {}
    hs = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, first(o).clone()))
          for i, b in enumerate(blocks(hf))]
    with torch.no_grad():
        hf(ids(prompt(3, 4)))
        a0 = outs[0]
        hf(ids(prompt(5, 6)))
    for h in hs:
        h.remove()
    assert close(early, a0) and close(late, outs[2]) and untouched(hf)


def test_stop_outside_an_invoke_is_an_error(lm, hf):
    with pytest.raises(nnpatch.NNPatchError, match="inside an invoke"):
        with lm.trace() as tracer:
            tracer.stop()
    assert untouched(hf)


# -- scan -------------------------------------------------------------------------------------------

def test_scan_gives_the_shapes_of_a_real_trace(lm, hf):
    with lm.scan() as tracer:
        with tracer.invoke(prompt(3, 4, 5)):
            short = block_envoys(lm)[0].output.shape
            logits = lm.output.logits
        with tracer.invoke([prompt(3, 4, 5, 6, 7, 8, 9, 10), prompt(1)]):
            long = block_envoys(lm)[1].output.shape
            block_envoys(lm)[1].output[:] = 0
    with lm.trace() as tracer:
        with tracer.invoke(prompt(3, 4, 5)):
            real_short = block_envoys(lm)[0].output.shape
        with tracer.invoke([prompt(3, 4, 5, 6, 7, 8, 9, 10), prompt(1)]):
            real_long = block_envoys(lm)[1].output.shape
    assert (short, long) == (real_short, real_long) == ((1, 3, 32), (2, 8, 32))
    assert isinstance(logits, FakeTensor) and logits.shape == (1, 3, 60)
    assert untouched(hf)


def test_scan_checks_edits_as_a_trace_does(lm, hf):
    with pytest.raises(ValueError, match=r"shape \(1, 2, 32\)"):
        with lm.trace(prompt(1, 2), scan=True):
            block_envoys(lm)[0].output = torch.zeros(1, 2, 5)
    assert untouched(hf)
    with lm.scan(prompt(1, 2)) as tracer:
        cache = tracer.cache(modules=["lm_head"])
    assert cache["lm_head"].output.shape == (1, 2, 60)


def test_ctrl_c_mid_forward_leaves_no_gate_or_hook(lm, hf):
    def interrupt(m, a, o):
        raise KeyboardInterrupt
    handle = blocks(hf)[1].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            with lm.trace(prompt(1, 2, 3)) as tracer:
                tracer.cache(modules=[block_envoys(lm)[0]])
                block_envoys(lm)[2].skip(block_envoys(lm)[2].input)
                source = block_envoys(lm)[1].mlp.source  # a .source forward installed on block 1's MLP
                getattr(source, next(n for n in source.names if "act" in n)).output.sum()
                lm.output.logits.save()
    finally:
        handle.remove()
    assert untouched(hf)
