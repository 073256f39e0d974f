"""Generation together with the rest of the tracing surface: a cache records every step, and a
`model.edit()` applies at every step, each against Hugging Face's `generate` with plain hooks."""
import torch

import nnpatch
from conftest import all_hooks

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _hooked_generate(model, hook, path="transformer.h.1", steps=3):
    """hf.generate with a plain forward hook on `path`; returns the generated ids."""
    hf = model.module
    handle = hf.get_submodule(path).register_forward_hook(hook)
    try:
        enc = model.tokenizer(PROMPT, return_tensors="pt")
        return hf.generate(**enc, max_new_tokens=steps, do_sample=False, pad_token_id=model._pad_id())
    finally:
        handle.remove()


def test_cache_records_every_generation_step():
    model = nnpatch.models.load("ioi")
    seen = []
    _hooked_generate(model, lambda m, a, o: seen.append(o.detach().clone()))
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
        cache = tracer.cache(modules=["transformer.h.1"])
    calls = cache["transformer.h.1"].calls
    assert [c.step for c in calls] == [0, 1, 2]
    assert [tuple(c.output.shape) for c in calls] == [tuple(s.shape) for s in seen]
    assert all(torch.allclose(c.output, s, atol=1e-5) for c, s in zip(calls, seen))
    assert all_hooks(model.module) == 0


def test_an_edit_steers_every_generation_step():
    model = nnpatch.models.load("ioi")
    vec = 30 * model.transformer.wte.weight[model.to_tokens(" John")[0]].detach()
    with model.edit() as (tracer, steered):
        for step in tracer.all():
            steered.transformer.h[1].output[:, -1] += vec
    with steered.generate(PROMPT, max_new_tokens=4, do_sample=False):
        ids = steered.generator.output.save()
    with model.generate(PROMPT, max_new_tokens=4, do_sample=False):
        plain = model.generator.output.save()
    ref = _hooked_generate(model, lambda m, a, o: torch.cat([o[:, :-1], o[:, -1:] + vec], 1), steps=4)
    assert torch.equal(ids, ref)
    assert not torch.equal(plain, ids)  # the steering changed the completion
    assert all_hooks(model.module) == 0
