"""Generation with interventions (`model.generate`), checked against a hand-written reference:
Hugging Face's own `generate` on the same weights, with plain PyTorch forward hooks that count
the model's calls (one per step) and edit or record a block's output at the chosen steps.

Covered: reading per-step hidden states, steering at every step, patching only the first step,
`tracer.iter[k]`, `[a:b]`, `[[i, j]]`, the `with` form, `module.next()`, `model.generator.output`
and `tracer.result`, invokes batched with left padding (each equals its prompt alone),
per-step synchronization across invokes without barriers, sampling, a streamer, an early stop,
one-token prompts, equal prompts, max_new_tokens=1, GPT-2 and Llama configs and the bundled ioi
model; and the errors (iter on a plain trace, a step beyond max_new_tokens, next() past the end),
after which the model has no hooks and computes what it did before.
"""
import pathlib
import re
import warnings

import pytest
import torch
from conftest import all_hooks, blocks, gpt2, llama, prompt, word_tokenizer

import nnpatch
from nnpatch.engine import compile_source
from nnpatch.errors import NNPatchError

LAYER = 1


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    """(nnpatch model, the same plain Hugging Face module)."""
    hf = gpt2() if request.param == "gpt2" else llama()
    return nnpatch.LanguageModel(hf, tokenizer=word_tokenizer()), hf


@pytest.fixture(scope="module")
def ioi():
    return nnpatch.models.load("ioi")


def layer(model, i=LAYER):
    return model.transformer.h[i] if hasattr(model, "transformer") else model.model.layers[i]


def hidden(envoy):
    """A block's hidden state inside a trace (the first element when the block returns a tuple)."""
    out = envoy.output
    return out[0] if isinstance(out, tuple) else out


# -- the reference: plain generate with hooks ------------------------------------------------------

def reference(hf, tok, prompts, *, edit=None, layer_index=LAYER, seed=None, **kwargs):
    """Generated ids and the block's output at every step (after `edit(step, h) -> h`), from
    Hugging Face's generate with forward hooks, prompts left-padded as one batch."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    step = [-1]
    seen = []

    def count(module, args):
        step[0] += 1

    def at_block(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if edit is not None:
            h = edit(step[0], h.clone())
        seen.append(h.detach().clone())
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handles = [hf.register_forward_pre_hook(count), blocks(hf)[layer_index].register_forward_hook(at_block)]
    try:
        if seed is not None:
            torch.manual_seed(seed)
        ids = hf.generate(**enc, pad_token_id=tok.pad_token_id, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return ids, seen, enc["attention_mask"]


def own(ids, mask_row):
    """One row of left-padded generated ids without its padding."""
    pad = int((mask_row == 0).sum())
    return ids[pad:]


def close(a, b, tol=1e-5):
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    assert torch.allclose(a.double(), b.double(), atol=tol, rtol=tol), (a - b).abs().max()


# -- reading ------------------------------------------------------------------------------------------

def test_reads_bind_to_the_first_step_without_a_loop(pair):
    model, hf = pair
    p = prompt(3, 5, 7, 9)
    with model.generate(p, max_new_tokens=3, do_sample=False):
        h = hidden(layer(model)).save()
        ids = model.generator.output.save()
    want_ids, seen, _ = reference(hf, model.tokenizer, [p], max_new_tokens=3, do_sample=False)
    close(h, seen[0])
    assert torch.equal(ids, want_ids)
    assert all_hooks(hf) == 0


def test_per_step_hidden_states_equal_the_reference(pair):
    model, hf = pair
    p = prompt(4, 6, 8)
    with model.generate(p, max_new_tokens=5, do_sample=False) as tracer:
        hs = []
        for step in tracer.all():
            hs.append(hidden(layer(model)).save())
        ids = tracer.result.save()
    want_ids, seen, _ = reference(hf, model.tokenizer, [p], max_new_tokens=5, do_sample=False)
    assert torch.equal(ids, want_ids)
    assert len(hs) == len(seen) == want_ids.shape[1] - 3
    for got, want in zip(hs, seen):
        close(got, want)
    assert hs[0].shape[1] == 3 and all(h.shape[1] == 1 for h in hs[1:])


def test_steering_every_step_changes_later_tokens_identically(pair):
    model, hf = pair
    p = prompt(3, 5, 7, 9)
    torch.manual_seed(1)
    v = 4 * torch.randn(hf.config.hidden_size)

    def steer(step, h):
        h[:, -1] += v
        return h
    with model.generate(p, max_new_tokens=6, do_sample=False, min_new_tokens=6) as tracer:
        for step in tracer.all():
            hidden(layer(model))[:, -1] += v
        ids = model.generator.output.save()
    want, _, _ = reference(hf, model.tokenizer, [p], edit=steer, max_new_tokens=6, do_sample=False,
                           min_new_tokens=6)
    plain, _, _ = reference(hf, model.tokenizer, [p], max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(ids, want)
    assert not torch.equal(want, plain), "the steering vector must change the tokens for this test to mean something"


def test_patch_only_the_first_step(pair):
    model, hf = pair
    p = prompt(10, 11, 12)
    torch.manual_seed(2)
    v = 4 * torch.randn(hf.config.hidden_size)

    def first_only(step, h):
        if step == 0:
            h[:, -1] += v
        return h
    with model.generate(p, max_new_tokens=5, do_sample=False, min_new_tokens=5) as tracer:
        for step in tracer.iter[0]:
            hidden(layer(model))[:, -1] += v
        after = []
        for step in tracer.iter[1:]:
            after.append(hidden(layer(model)).save())
        ids = model.generator.output.save()
    want, seen, _ = reference(hf, model.tokenizer, [p], edit=first_only, max_new_tokens=5,
                              do_sample=False, min_new_tokens=5)
    assert torch.equal(ids, want)
    assert len(after) == 4
    for got, ref in zip(after, seen[1:]):
        close(got, ref)


def test_the_default_first_step_edit_equals_iter_zero(pair):
    """Without a loop an edit applies at step 0 only (nnsight's semantics)."""
    model, hf = pair
    p = prompt(10, 11, 12)
    v = torch.full((hf.config.hidden_size,), 3.0)
    with model.generate(p, max_new_tokens=4, do_sample=False):
        hidden(layer(model))[:, -1] += v
        a = model.generator.output.save()
    with model.generate(p, max_new_tokens=4, do_sample=False) as tracer:
        for step in tracer.iter[0]:
            hidden(layer(model))[:, -1] += v
        b = model.generator.output.save()
    assert torch.equal(a, b)


def test_the_model_input_and_output_at_every_step(pair):
    model, hf = pair
    p = prompt(5, 6, 7)
    kw = dict(max_new_tokens=3, do_sample=False, min_new_tokens=3)
    with model.generate(p, **kw) as tracer:
        fed, logits = [], []
        for step in tracer.all():
            fed.append(model.inputs[1]["input_ids"].save())
            logits.append(model.output.logits[:, -1].save())
        ids = model.generator.output.save()
    assert [f.tolist() for f in fed] == [ids[:, :3].tolist(), ids[:, 3:4].tolist(), ids[:, 4:5].tolist()]
    for k, l in enumerate(logits):  # greedy: each step's logits choose the next token
        assert int(l.argmax(-1)) == int(ids[0, 3 + k])
    with torch.no_grad():
        close(logits[0], hf(ids[:, :3]).logits[:, -1])


def test_iter_selections_and_the_with_form(pair):
    model, hf = pair
    p = prompt(5, 6, 7, 8, 9)
    kw = dict(max_new_tokens=5, do_sample=False, min_new_tokens=5)
    with model.generate(**kw) as tracer:
        with tracer.invoke(p):
            some = {}
            for step in tracer.iter[[0, 3]]:
                some[step] = hidden(layer(model)).save()
        with tracer.invoke(p):  # an equal prompt in its own rows
            mid = []
            with tracer.iter[1:3] as k:   # nnsight's block form, same as the loop
                mid.append((k, hidden(layer(model)).save()))
    with model.generate(p, **kw) as tracer:
        every = []
        with tracer.all():
            every.append(hidden(layer(model)).save())
    _, seen, _ = reference(hf, model.tokenizer, [p], **kw)
    assert sorted(some) == [0, 3]
    close(some[0], seen[0])
    close(some[3], seen[3])
    assert [k for k, _ in mid] == [1, 2]
    close(mid[0][1], seen[1])
    close(mid[1][1], seen[2])
    assert len(every) == 5 and all(torch.equal(a, b) for a, b in zip(every, seen))


def test_next_moves_one_module_to_its_next_call(pair):
    model, hf = pair
    p = prompt(5, 6, 7)
    kw = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    with model.generate(p, **kw):
        h0 = hidden(layer(model)).save()
        h1 = hidden(layer(model).next()).save()
        other = hidden(layer(model, 0).next(2)).save()  # layer 0 at step 2, before layer 1's
        h2 = hidden(layer(model).next()).save()
    _, seen, _ = reference(hf, model.tokenizer, [p], **kw)
    close(h0, seen[0])
    close(h1, seen[1])
    close(h2, seen[2])
    _, seen0, _ = reference(hf, model.tokenizer, [p], layer_index=0, **kw)
    close(other, seen0[2])  # each module's next() moves that module only


def test_batched_left_padded_invokes_equal_each_prompt_alone(pair):
    model, hf = pair
    short, long = prompt(20, 21), prompt(3, 5, 7, 9, 11)
    kw = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    with model.generate(**kw) as tracer:
        with tracer.invoke(short):
            hs_short = []
            for step in tracer.all():
                hs_short.append(hidden(layer(model)).save())
            ids_short = model.generator.output.save()
        with tracer.invoke(long):
            hs_long = []
            for step in tracer.all():
                hs_long.append(hidden(layer(model)).save())
            ids_long = model.generator.output.save()
    for text, ids, hs in ((short, ids_short, hs_short), (long, ids_long, hs_long)):
        want, seen, _ = reference(hf, model.tokenizer, [text], **kw)
        assert torch.equal(ids, want)  # its own rows, without the batch's left padding
        assert len(hs) == len(seen)
        for got, ref in zip(hs, seen):
            close(got, ref, tol=1e-4)
    assert ids_short.shape[1] == 2 + 4 and ids_long.shape[1] == 5 + 4


def test_batched_equals_the_same_batch_in_plain_generate(pair):
    """Steering one invoke of a batch: its rows equal the reference that steers those rows of
    the same left-padded batch, the other invoke's rows are untouched."""
    model, hf = pair
    a, b = prompt(3, 4, 5), prompt(6, 7, 8, 9, 10, 11)
    v = torch.full((hf.config.hidden_size,), 2.5)
    kw = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    with model.generate(**kw) as tracer:
        with tracer.invoke(a):
            ids_a = model.generator.output.save()
        with tracer.invoke(b):
            for step in tracer.all():
                hidden(layer(model))[:, -1] += v
            ids_b = model.generator.output.save()

    def steer_row_1(step, h):
        h[1, -1] += v
        return h
    want, _, mask = reference(hf, model.tokenizer, [a, b], edit=steer_row_1, **kw)
    assert torch.equal(ids_a[0], own(want[0], mask[0]))
    assert torch.equal(ids_b[0], own(want[1], mask[1]))


def test_cross_invoke_sync_per_step_without_barriers(pair):
    """Invoke B is steered at step k with invoke A's hidden state at step k, whichever invoke
    is written first."""
    model, hf = pair
    a, b = prompt(3, 5, 7), prompt(30, 31, 32)
    kw = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    _, a_seen, _ = reference(hf, model.tokenizer, [a], **kw)

    def put(step, h):
        h[:, -1] = a_seen[step][:, -1]
        return h
    want, _, _ = reference(hf, model.tokenizer, [b], edit=put, **kw)

    with model.generate(**kw) as tracer:
        with tracer.invoke(a):
            for step in tracer.all():
                src = hidden(layer(model))[:, -1]
        with tracer.invoke(b):
            for step in tracer.all():
                hidden(layer(model))[:, -1] = src
            ids_b = model.generator.output.save()
    assert torch.equal(ids_b, want)

    with model.generate(**kw) as tracer:  # the consumer written first
        with tracer.invoke(b):
            for step in tracer.all():
                hidden(layer(model))[:, -1] = src2  # noqa: F821 - assigned by the next invoke
            ids_b2 = model.generator.output.save()
        with tracer.invoke(a):
            for step in tracer.all():
                src2 = hidden(layer(model))[:, -1]  # noqa: F841 - read by the first invoke
    assert torch.equal(ids_b2, want)


# -- coincidences ---------------------------------------------------------------------------------------

def test_one_token_prompts_equal_prompts_and_one_new_token(pair):
    model, hf = pair
    one = prompt(7)
    with model.generate(max_new_tokens=1, do_sample=False) as tracer:
        with tracer.invoke(one):
            h1 = []
            for step in tracer.all():
                h1.append(hidden(layer(model)).save())
            ids1 = model.generator.output.save()
        with tracer.invoke(one):  # an equal prompt: its own rows, the same values
            h2 = hidden(layer(model)).save()
            ids2 = model.generator.output.save()
    want, seen, _ = reference(hf, model.tokenizer, [one], max_new_tokens=1, do_sample=False)
    assert len(h1) == 1
    close(h1[0], seen[0])
    close(h2, seen[0])
    assert torch.equal(ids1, want) and torch.equal(ids2, want)
    assert ids1.shape == (1, 2)


def test_d_model_equal_to_the_prompt_length():
    """Hidden width 8 == an 8-token prompt == the batch's padded length: positions are still cut
    right at step 0 and not at later steps."""
    hf = gpt2(d=8)
    model = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    eight, two = prompt(*range(2, 10)), prompt(3, 4)
    kw = dict(max_new_tokens=3, do_sample=False, min_new_tokens=3)
    with model.generate(**kw) as tracer:
        with tracer.invoke(eight):
            h8 = []
            for step in tracer.all():
                h8.append(hidden(layer(model)).save())
        with tracer.invoke(two):
            h2 = hidden(layer(model)).save()
    _, seen8, _ = reference(hf, model.tokenizer, [eight], **kw)
    _, seen2, _ = reference(hf, model.tokenizer, [two], **kw)
    for got, want in zip(h8, seen8):
        close(got, want, tol=1e-4)
    close(h2, seen2[0], tol=1e-4)


# -- generate's own arguments ---------------------------------------------------------------------------

def test_sampling_kwargs_reach_generate(pair):
    model, hf = pair
    p = prompt(3, 5, 7)
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=20)
    torch.manual_seed(123)
    with model.generate(p, **kw):
        ids = model.generator.output.save()
    want, _, _ = reference(hf, model.tokenizer, [p], seed=123, **kw)
    assert torch.equal(ids, want)


def test_a_streamer_gets_the_tokens(pair):
    model, hf = pair

    class Collect:
        def __init__(self):
            self.got = []

        def put(self, value):
            self.got.append(value.clone())

        def end(self):
            self.got.append("end")
    streamer = Collect()
    p = prompt(3, 5, 7)
    with model.generate(p, max_new_tokens=3, do_sample=False, min_new_tokens=3, streamer=streamer):
        ids = model.generator.output.save()
    assert streamer.got[-1] == "end"
    assert torch.equal(torch.cat([t.reshape(1, -1) for t in streamer.got[:-1]], dim=1), ids)


def test_an_early_stop_ends_all_cleanly():
    """An end-of-sequence token stops generation early: tracer.all() ends after the last step
    made, the code after the loop runs, and nothing warns."""
    hf = llama()  # (the random GPT-2 repeats one token, which cannot stop it at step 2)
    model = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    p = prompt(10, 20, 30)
    free, _, _ = reference(hf, model.tokenizer, [p], max_new_tokens=6, do_sample=False, eos_token_id=[])
    new = free[0, 3:].tolist()
    made = next(i + 1 for i in range(1, len(new)) if new[i] not in new[:i])
    eos = new[made - 1]  # the first token not generated before ends generation after `made` steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.generate(max_new_tokens=6, do_sample=False, eos_token_id=eos) as tracer:
            with tracer.invoke(p):
                hs = []
                for step in tracer.all():
                    hs.append(hidden(layer(model)).save())
                after = len(hs)
                ids = model.generator.output.save()
            with tracer.invoke(p):
                bounded = []
                for step in tracer.iter[0:5]:  # a bounded loop past the stop ends there too
                    bounded.append(step)
    want, seen, _ = reference(hf, model.tokenizer, [p], max_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert ids.shape[1] == 3 + made and torch.equal(ids, want)
    assert after == len(hs) == len(seen) == made < 6
    assert bounded == list(range(made))
    assert not [str(w.message) for w in caught]


def test_the_bundled_ioi_model(ioi):
    """Steering the ioi model's completion, against the reference on its own weights."""
    p = "When Mary and John went to the store, John gave a drink to"
    tok = ioi.tokenizer
    mary = ioi.module.transformer.wte.weight[ioi.to_tokens(" Mary")[0]].detach()
    kw = dict(max_new_tokens=4, do_sample=False)

    def steer(step, h):
        h[:, -1] -= 2 * mary
        return h
    with ioi.generate(p, **kw) as tracer:
        for step in tracer.all():
            ioi.transformer.h[1].output[:, -1] -= 2 * mary
        ids = tracer.result.save()
    want, _, _ = reference(ioi.module, tok, [p], edit=steer, **kw)
    assert torch.equal(ids, want)
    assert all_hooks(ioi.module) == 0


# -- errors --------------------------------------------------------------------------------------------

def _untouched(model, hf, p):
    assert all_hooks(hf) == 0
    with torch.no_grad():
        want = hf(**model.tokenizer(p, return_tensors="pt")).logits
    with model.trace(p):
        got = model.lm_head.output.save()
    close(got, want)


def test_iter_on_a_plain_trace_is_an_error(pair):
    model, hf = pair
    p = prompt(3, 4)
    with pytest.raises(NNPatchError, match=r"tracer.iter .*model.generate\(prompt, max_new_tokens=N\)"):
        with model.trace(p) as tracer:
            for step in tracer.iter[1]:
                hidden(layer(model))[:] = 0
    with pytest.raises(NNPatchError, match=r"tracer.all\(\).*model.generate"):
        with model.trace(p) as tracer:
            for step in tracer.all():
                pass
    with pytest.raises(NNPatchError, match=r"\.next\(\).*model.generate"):
        with model.trace(p):
            layer(model).next()
    with pytest.raises(NNPatchError, match=r"model.generator.output is what a generation produced"):
        with model.trace(p):
            model.generator.output
    _untouched(model, hf, p)


def test_a_step_beyond_max_new_tokens_is_an_error(pair):
    model, hf = pair
    p = prompt(3, 4)
    with pytest.raises(IndexError, match=r"tracer.iter\[3\] asks for step 3.*at most 3 steps \(max_new_tokens=3"):
        with model.generate(p, max_new_tokens=3) as tracer:
            hidden(layer(model))[:] = 0
            for step in tracer.iter[3]:
                pass
    with pytest.raises(IndexError, match=r"tracer.iter\[1:5\] asks for step 3"):
        with model.generate(p, max_new_tokens=3) as tracer:
            for step in tracer.iter[1:5]:
                pass
    with pytest.raises(IndexError, match=r"tracer.iter\[\[0, 7\]\] asks for step 7"):
        with model.generate(p, max_new_tokens=3) as tracer:
            for step in tracer.iter[[0, 7]]:
                pass
    _untouched(model, hf, p)


def test_next_past_the_end_is_an_error(pair):
    model, hf = pair
    p = prompt(3, 4)
    name = "transformer.h.1" if hasattr(hf, "transformer") else "model.layers.1"
    with pytest.raises(IndexError, match=rf"{name}.next\(\) would move to step 2, .*max_new_tokens=2"):
        with model.generate(p, max_new_tokens=2, do_sample=False):
            hidden(layer(model).next().next())[:] = 0
    _untouched(model, hf, p)


def test_an_error_at_a_later_step_leaves_no_hooks(pair):
    model, hf = pair
    p = prompt(3, 4)
    with pytest.raises(ValueError, match="shape"):
        with model.generate(p, max_new_tokens=4, do_sample=False) as tracer:
            for step in tracer.all():
                if step == 2:
                    layer(model).output = torch.zeros(5, 5, 5)
    _untouched(model, hf, p)


def test_an_interrupt_inside_generate_leaves_no_hooks(pair):
    """Ctrl-C (here from a streamer, at the third token) while invokes wait at later steps."""
    model, hf = pair
    p = prompt(3, 4)

    class Interrupt:
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt

        def end(self):
            pass
    with pytest.raises(KeyboardInterrupt):
        with model.generate(p, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                            streamer=Interrupt()) as tracer:
            for step in tracer.all():
                hidden(layer(model))[:, -1] += 1.0
    _untouched(model, hf, p)


def test_gradients_are_refused(pair):
    model, hf = pair
    p = prompt(3, 4)
    with pytest.raises(NNPatchError, match="runs without autograd"):
        with model.generate(p, max_new_tokens=2):
            h = hidden(layer(model))
            model.lm_head.output.sum().backward()
            g = h.grad  # noqa: F841
    _untouched(model, hf, p)


def test_token_ids_and_the_batch_result(pair):
    """Token ids (a tensor, or input_ids= with a mask) as inputs; after the block tracer.result
    is the whole left-padded batch, inside each invoke its own rows."""
    model, hf = pair
    a = torch.tensor([[5, 6, 7, 8]])
    b = torch.tensor([[9, 10]])
    kw = dict(max_new_tokens=2, do_sample=False, min_new_tokens=2)
    with model.generate(**kw) as tracer:
        with tracer.invoke(a):
            ids_a = tracer.result
        with tracer.invoke(input_ids=b, attention_mask=torch.ones_like(b)):
            ids_b = model.generator.output
    whole = tracer.result
    # (padded to 5, not 4: a padded width equal to the head count, 4, is avoided on purpose)
    assert whole.shape[0] == 2 and torch.equal(whole[0, -6:], ids_a[0]) and torch.equal(whole[1, -4:], ids_b[0])
    assert ids_a.shape == (1, 6) and ids_b.shape == (1, 4)
    assert torch.equal(ids_a, hf.generate(a, attention_mask=torch.ones_like(a), pad_token_id=0, **kw))
    assert torch.equal(ids_b, hf.generate(b, attention_mask=torch.ones_like(b), pad_token_id=0, **kw))


def test_beams_are_refused(pair):
    model, hf = pair
    with pytest.raises(ValueError, match="num_beams=2"):
        model.generate(prompt(3), max_new_tokens=2, num_beams=2)
    assert all_hooks(hf) == 0


# -- the documentation's examples run -------------------------------------------------------------------

def test_docs_generation_page_runs():
    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "generation.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert len(blocks) >= 3
    namespace = {}
    for i, block in enumerate(blocks):  # each block asserts what it shows
        exec(compile_source(block, f"<generation.md block {i}>"), namespace)
    assert all_hooks(namespace["model"].module) == 0
