"""model.edit() (a copy or in place, cleared with clear_edits) and model.session(), against plain
forward hooks on the same weights."""
import threading

import pytest
import torch

import nnpatch
from conftest import all_hooks, block_envoys, blocks, close, first, gpt2, ids, llama, prompt, word_tokenizer


@pytest.fixture(params=["gpt2", "llama"])
def hf(request):
    return {"gpt2": gpt2, "llama": llama}[request.param]()


@pytest.fixture
def lm(hf):
    return nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())


def hooked(hf, text, edits):
    """Logits and block outputs with edits {block: fn(output) -> output}."""
    outs, handles = {}, []
    for i, block in enumerate(blocks(hf)):
        def hook(m, a, o, i=i):
            if i in edits:
                o = edits[i](first(o).clone())
            outs[i] = first(o).detach().clone()
            return o
        handles.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return hf(ids(text)).logits, outs
    finally:
        for h in handles:
            h.remove()


def test_an_edited_copy_steers_every_trace_and_leaves_the_model_alone(lm, hf):
    scale = 3.0
    with lm.edit() as (tracer, edited):
        block_envoys(edited)[0].output[:] *= scale
    scale = 100.0  # the edit keeps the value it had where it was written
    text = prompt(3, 4, 5)
    with edited.trace(text):
        steered = edited.output.logits.save()
    with lm.trace(text):
        plain = lm.output.logits.save()
    want, _ = hooked(hf, text, {0: lambda h: h * 3})
    assert close(steered, want)
    assert close(plain, hooked(hf, text, {})[0])
    assert isinstance(tracer, nnpatch.engine.edit.EditTracer) and edited is not lm
    assert all_hooks(hf) == 0


def test_edits_come_before_the_traces_own_reads_and_edits(lm, hf):
    with lm.edit() as (_, edited):
        block_envoys(edited)[1].output[:, -1] = 0
    a, b = prompt(6, 7, 8), prompt(9)  # two invokes of different lengths, one a single token
    with edited.trace() as tracer:
        with tracer.invoke(a):
            h1 = block_envoys(edited)[1].output.save()
            block_envoys(edited)[2].output[:] *= 0.5
            got_a = edited.output.logits.save()
        with tracer.invoke(b):
            got_b = edited.output.logits.save()

    def zero_last(h):
        h[:, -1] = 0
        return h
    want_a, outs = hooked(hf, a, {1: zero_last, 2: lambda h: h * 0.5})
    want_b, _ = hooked(hf, b, {1: zero_last})
    assert close(h1, outs[1]) and (h1[:, -1] == 0).all()
    assert close(got_a, want_a) and close(got_b, want_b)


def test_edits_apply_in_a_further_pass_too(lm, hf):
    with lm.edit() as (_, edited):
        block_envoys(edited)[0].output[:] *= 2
    a, b = prompt(11, 12), prompt(13, 14)
    with edited.trace() as tracer:
        with tracer.invoke(a):  # needs invoke b's layer-2 value at layer 0: a further pass
            block_envoys(edited)[0].output[:] = late
            got = edited.output.logits.save()
        with tracer.invoke(b):
            late = block_envoys(edited)[2].output
    _, b_outs = hooked(hf, b, {0: lambda h: h * 2})
    want, _ = hooked(hf, a, {0: lambda h: b_outs[2].clone()})
    assert close(got, want)


def test_in_place_edits_and_clear_edits(lm, hf):
    with lm.edit(inplace=True) as tracer:
        block_envoys(lm)[1].output[:] = 0
    text = prompt(20, 21, 22)
    with lm.trace(text):
        edited = lm.output.logits.save()
    with lm.edit(inplace=True):  # a second edit adds to the first
        block_envoys(lm)[2].output[:] *= -1
    with lm.trace(text):
        twice = lm.output.logits.save()
    lm.clear_edits()
    with lm.trace(text):
        cleared = lm.output.logits.save()
    assert isinstance(tracer, nnpatch.engine.edit.EditTracer)
    assert close(edited, hooked(hf, text, {1: lambda h: h * 0})[0])
    assert close(twice, hooked(hf, text, {1: lambda h: h * 0, 2: lambda h: -h})[0])
    assert close(cleared, hooked(hf, text, {})[0])


def test_an_edit_that_fails_later_leaves_the_model_as_before(lm, hf):
    with lm.edit() as (_, edited):
        block_envoys(edited)[0].output = torch.zeros(5)  # wrong width: found when it runs
    with pytest.raises(ValueError, match="cannot set"):
        with edited.trace(prompt(1, 2)):
            edited.output.logits.save()
    assert all_hooks(hf) == 0 and not any("forward" in m.__dict__ for m in hf.modules())
    with lm.trace(prompt(1, 2)):
        plain = lm.output.logits.save()
    assert close(plain, hooked(hf, prompt(1, 2), {})[0])


# -- session ----------------------------------------------------------------------------------------

def test_a_session_passes_values_between_traces(lm, hf):
    clean, corrupt = prompt(3, 4, 5), prompt(6, 7, 8)
    with lm.session() as session:
        with lm.trace(clean):
            h = block_envoys(lm)[1].output
        with lm.trace(corrupt):
            block_envoys(lm)[1].output[:, -1] = h[:, -1]
            patched = lm.output.logits.save()
        total = [patched.sum()]
    _, clean_outs = hooked(hf, clean, {})

    def patch(x):
        x[:, -1] = clean_outs[1][:, -1]
        return x
    assert close(patched, hooked(hf, corrupt, {1: patch})[0])
    assert session.traces == 2 and len(total) == 1 and h.shape == (1, 3, 32)
    assert all_hooks(hf) == 0


def test_a_session_holds_the_model_until_it_ends(lm, hf):
    order = []
    started = threading.Event()

    def other():
        started.set()
        with lm.trace(prompt(9, 9)):
            lm.output.logits.sum()
        order.append("other")

    with lm.session():
        with lm.trace(prompt(1, 2)):
            lm.output.logits.sum()
        thread = threading.Thread(target=other)
        thread.start()
        started.wait()
        thread.join(0.3)  # the other thread's trace waits for the session
        order.append("session")
    thread.join(30)
    assert order == ["session", "other"]


def test_an_edit_of_later_layers_does_not_hold_up_stop(lm, hf):
    with lm.edit() as (_, edited):
        block_envoys(edited)[0].output[:] *= 2
        block_envoys(edited)[2].output[:] = 0  # after the stop: never reached, and no error
    text = prompt(4, 5, 6)
    ran = []
    handle = blocks(hf)[2].register_forward_hook(lambda *a: ran.append(1))
    try:
        with edited.trace(text) as tracer:
            h1 = block_envoys(edited)[1].output.save()
            tracer.stop()
    finally:
        handle.remove()
    _, outs = hooked(hf, text, {0: lambda h: h * 2})
    assert ran == [] and close(h1, outs[1]) and all_hooks(hf) == 0


def test_an_edits_step_loop_belongs_to_the_generation_it_runs_in(lm):
    with lm.edit() as (tracer, _):
        pass
    with pytest.raises(nnpatch.NNPatchError, match="inside the edit's body"):
        tracer.all()
    with pytest.raises(nnpatch.NNPatchError, match="inside the edit's body"):
        tracer.iter
