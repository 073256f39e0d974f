"""The two nnsight forum threads that motivated nnpatch, as the project's own tests.

Thread 000 ("What is a Mediator exception?"): attribution patching reads, in one trace, the clean
activations and the corrupt activations with their gradients. The poster read `.input` again
inside the backward block and walked the layers forward; the accepted answer re-assigned each
value and read the gradients in reverse layer order. Both must give torch.autograd's numbers.

Thread 001 ("Patching in 0.5"): clean MLP outputs at three positions patched into a corrupt run,
with three invokes in one trace. The poster's `tracer.barrier(3)` deadlocked nnsight; the
accepted answer placed two barriers by hand. Both, and the same program with no barrier, must
give the number of a plain PyTorch hook reference.

The models are conftest's random-weight GPT-2 and Llama. ../shared/acceptance holds the threads'
programs as posted; tests/test_acceptance.py runs them when that folder is there.
"""
import pytest
import torch

from conftest import gpt2, ids, llama, prompt, word_tokenizer
from nnpatch import LanguageModel

# -- thread 000: attribution patching, gradients read in either order ----------------------------

CLEAN = prompt(1, 2, 3, 4, 5, 6, 7, 8, 9)
CORRUPT = prompt(1, 2, 3, 40, 5, 6, 7, 8, 9)
RIGHT, WRONG = 11, 23  # token ids the metric compares


def logit_gap(logits):
    return logits[0, -1, RIGHT] - logits[0, -1, WRONG]


def autograd_reference():
    """Per block: the input of attn.c_proj in the clean run, in the corrupt run, and the gradient
    of the corrupt run's logit gap with respect to it, from plain hooks and torch.autograd."""
    hf = gpt2()  # same seed as the wrapped model: same weights
    projections = [block.attn.c_proj for block in hf.transformer.h]

    def run(text):
        seen = {}

        def keep(i):
            def hook(module, args):
                args[0].retain_grad()
                seen[i] = args[0]
            return hook
        handles = [p.register_forward_pre_hook(keep(i)) for i, p in enumerate(projections)]
        try:
            logits = hf(ids(text)).logits
        finally:
            for h in handles:
                h.remove()
        return logits, [seen[i] for i in range(len(projections))]

    _, clean = run(CLEAN)
    logits, corrupt = run(CORRUPT)
    logit_gap(logits).backward()
    return [x.detach() for x in clean], [x.detach() for x in corrupt], [x.grad for x in corrupt]


def posters_attribution(model):
    """Forward layer order, `.input` read again inside the backward block."""
    clean_acts, corrupt_acts, corrupt_grads = [], [], []
    with model.trace() as tracer:
        with tracer.invoke(CLEAN):
            for block in model.transformer.h:
                clean_acts.append(block.attn.c_proj.input.save())
        with tracer.invoke(CORRUPT):
            for block in model.transformer.h:
                corrupt_acts.append(block.attn.c_proj.input.save())
            gap = logit_gap(model.lm_head.output.save().cpu())
            with gap.backward():
                for block in model.transformer.h:
                    corrupt_grads.append(block.attn.c_proj.input.grad.save())
    return clean_acts, corrupt_acts, corrupt_grads


def answers_attribution(model):
    """Each value re-assigned to its module, gradients read in reverse layer order."""
    clean_acts, corrupt_acts, reversed_grads = [], [], []
    with model.trace() as tracer:
        with tracer.invoke(CLEAN):
            for block in model.transformer.h:
                clean_acts.append(block.attn.c_proj.input)
        with tracer.invoke(CORRUPT):
            for block in model.transformer.h:
                act = block.attn.c_proj.input
                block.attn.c_proj.input = act
                corrupt_acts.append(act)
            gap = logit_gap(model.lm_head.output.save().cpu())
            with gap.backward():
                for i in reversed(range(len(model.transformer.h))):
                    reversed_grads.append(corrupt_acts[i].grad)
    return clean_acts, corrupt_acts, reversed_grads[::-1]


@pytest.mark.parametrize("program", [posters_attribution, answers_attribution])
def test_attribution_patching_thread(program):
    model = LanguageModel(gpt2(), tokenizer=word_tokenizer())
    got = program(model)
    want = autograd_reference()
    for name, mine, theirs in zip(("clean input", "corrupt input", "corrupt gradient"), got, want):
        assert len(mine) == len(theirs) == 3, name
        for layer, (a, b) in enumerate(zip(mine, theirs)):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5), (name, layer)
    assert all(float(g.abs().sum()) > 0 for g in got[2])  # the gradients really flowed


# -- thread 001: three invokes, barriers misplaced, placed by hand, or left out ------------------

SOURCE = prompt(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
DAMAGED = prompt(1, 2, 3, 4, 5, 6, 50, 51, 52, 10, 11, 12)
SPOTS = [6, 7, 8]  # token positions whose MLP output is patched
LAYER = 1
GOOD, BAD = 17, 29  # the clean and the corrupt answer's token ids


def gap(logits):
    return logits[0, -1, GOOD] - logits[0, -1, BAD]


def hook_reference():
    """The restored fraction of the logit gap, from plain forward hooks."""
    hf = llama()  # same seed as the wrapped model: same weights
    mlp = hf.model.layers[LAYER].mlp
    kept = {}
    handle = mlp.register_forward_hook(lambda m, args, out: kept.__setitem__("mlp", out[:, SPOTS].clone()))
    with torch.no_grad():
        clean = gap(hf(ids(SOURCE)).logits)
    handle.remove()
    with torch.no_grad():
        corrupt = gap(hf(ids(DAMAGED)).logits)

    def write(m, args, out):
        out = out.clone()
        out[:, SPOTS] = kept["mlp"]
        return out
    handle = mlp.register_forward_hook(write)
    with torch.no_grad():
        patched = gap(hf(ids(DAMAGED)).logits)
    handle.remove()
    return float((patched - corrupt) / (clean - corrupt))


def posters_patching(model):
    """One barrier for three invokes, called before the third invoke reads anything; the result
    stored in a dict at trace level."""
    results = {}
    with model.trace() as tracer:
        meet = tracer.barrier(3)
        with tracer.invoke(SOURCE):
            clean_mlp = model.model.layers[LAYER].mlp.output[:, SPOTS, :]
            clean_gap = gap(model.lm_head.output)
            meet()
        with tracer.invoke(DAMAGED):
            corrupt_gap = gap(model.lm_head.output)
            meet()
        with tracer.invoke(DAMAGED):
            meet()
            mlp = model.model.layers[LAYER].mlp.output
            for i, spot in enumerate(SPOTS):
                mlp[:, spot, :] = clean_mlp[:, i, :]
            model.model.layers[LAYER].mlp.output = mlp
            patched_gap = gap(model.lm_head.output)
            restored = (patched_gap - corrupt_gap) / (clean_gap - corrupt_gap)
        results[LAYER] = restored.item().save()
    return results[LAYER]


def answers_patching(model):
    """Two barriers placed by hand: one for the MLP values, one for the corrupt logits."""
    with model.trace() as tracer:
        results = dict().save()
        mlp_ready = tracer.barrier(2)
        logits_ready = tracer.barrier(2)
        with tracer.invoke(SOURCE):
            clean_mlp = model.model.layers[LAYER].mlp.output[:, SPOTS, :]
            mlp_ready()
            clean_gap = gap(model.lm_head.output)
        with tracer.invoke(DAMAGED):
            corrupt_gap = gap(model.lm_head.output)
            logits_ready()
        with tracer.invoke(DAMAGED):
            mlp_ready()
            mlp = model.model.layers[LAYER].mlp.output
            for i, spot in enumerate(SPOTS):
                mlp[:, spot, :] = clean_mlp[:, i, :]
            model.model.layers[LAYER].mlp.output = mlp
            logits_ready()
            patched_gap = gap(model.lm_head.output)
            results[LAYER] = ((patched_gap - corrupt_gap) / (clean_gap - corrupt_gap)).item().save()
    return results[LAYER]


def barrier_free_patching(model):
    """What a user who never heard of barriers writes."""
    with model.trace() as tracer:
        with tracer.invoke(SOURCE):
            clean_mlp = model.model.layers[LAYER].mlp.output[:, SPOTS, :]
            clean_gap = gap(model.lm_head.output)
        with tracer.invoke(DAMAGED):
            corrupt_gap = gap(model.lm_head.output)
        with tracer.invoke(DAMAGED):
            model.model.layers[LAYER].mlp.output[:, SPOTS, :] = clean_mlp
            patched_gap = gap(model.lm_head.output)
        restored = ((patched_gap - corrupt_gap) / (clean_gap - corrupt_gap)).item()
    return restored


@pytest.mark.parametrize("program", [posters_patching, answers_patching, barrier_free_patching])
def test_patching_thread(program):
    model = LanguageModel(llama(), tokenizer=word_tokenizer())
    want = hook_reference()
    got = float(program(model))
    assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (got, want)
    assert abs(want) > 1e-3  # the patch moves the metric: a test that can fail
