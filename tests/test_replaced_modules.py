"""A submodule replaced after the model was wrapped (an MLP swapped for a transcoder or an
SAE-wrapped copy, a block swapped in a ModuleList): traces read, edit and call the module that is
there now.

Before: a wrapper kept the modules it had found by path and the envoys it had made. A read of the
replaced module's output waited on the old, detached module and failed with "was never computed",
and calling it aside from the trace (the logit lens' `model.transformer.ln_f(h)`) silently ran the
old module. Each test compares with plain forward hooks on the model as it is now. An envoy kept
from before its module was removed says what failed (it said "has no module or attribute
'output'": Python answers an AttributeError raised inside a property with __getattr__).
"""
import pytest
import torch

import nnpatch
from conftest import all_hooks, gpt2, hooked_forward, ids, prompt, word_tokenizer

A = prompt(3, 5, 7, 9, 11)


class Scaled(torch.nn.Module):
    """The replaced MLP times a constant: a different module with a different output."""

    def __init__(self, inner, k):
        super().__init__()
        self.inner, self.k = inner, k

    def forward(self, x):
        return self.inner(x) * self.k


def traced_once(hf):
    """A wrapper that has already traced the model, so that its caches hold the old modules."""
    model = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    with model.trace(A):
        before = model.transformer.h[1].mlp.output
        logits = model.lm_head.output
    assert before is not None and logits is not None
    return model


def test_a_replaced_mlp_is_read_and_edited_where_it_is_now():
    hf = gpt2()
    model = traced_once(hf)
    old = hf.transformer.h[1].mlp
    hf.transformer.h[1].mlp = Scaled(old, 3.0)
    seen = []
    reference = hooked_forward(hf, A, [(hf.transformer.h[1].mlp, lambda m, a, o: seen.append(o))])
    with model.trace(A):
        inner = model.transformer.h[1].mlp.inner.output
        out = model.transformer.h[1].mlp.output
        logits = model.lm_head.output
    assert torch.allclose(out, seen[0], atol=1e-6) and torch.allclose(inner * 3.0, out, atol=1e-6)
    assert torch.allclose(logits, reference, atol=1e-5)

    zeroed = hooked_forward(hf, A, [(hf.transformer.h[1].mlp, lambda m, a, o: torch.zeros_like(o))])
    with model.trace(A):
        model.transformer.h[1].mlp.output = torch.zeros_like(model.transformer.h[1].mlp.output)
        edited = model.lm_head.output
    assert torch.allclose(edited, zeroed, atol=1e-5) and not torch.allclose(zeroed, reference, atol=1e-3)
    assert all_hooks(hf) == 0 and all_hooks(old) == 0


def test_a_block_replaced_in_the_module_list():
    hf = gpt2()
    model = traced_once(hf)
    block = gpt2(seed=7).transformer.h[1]  # other weights
    hf.transformer.h[1] = block
    seen = []
    hooked_forward(hf, A, [(block, lambda m, a, o: seen.append(o))])
    with model.trace(A):
        out = model.transformer.h[1].output
    with model.trace(A):
        listed = [b.output for b in model.transformer.h][1]
    assert torch.allclose(out, seen[0], atol=1e-6) and torch.allclose(listed, seen[0], atol=1e-6)
    assert model.transformer.h[1].attn.c_attn.weight is block.attn.c_attn.weight


def test_calling_a_replaced_module_aside_runs_the_new_one():
    hf = gpt2()
    model = traced_once(hf)
    with model.trace(A):
        model.transformer.ln_f(model.transformer.h[2].output)  # makes the ln_f envoy
    new = torch.nn.LayerNorm(32)
    torch.nn.init.normal_(new.weight)  # the old one is LayerNorm's default: weight 1, bias 0
    hf.transformer.ln_f = new
    with torch.no_grad():
        h = hf.transformer.h[2](hf.transformer.h[1](hf.transformer.h[0](
            hf.transformer.wte(ids(A)) + hf.transformer.wpe(torch.arange(5)))))
        expected = hf.transformer.ln_f(h)
    with torch.no_grad(), model.trace(A):
        lens = model.transformer.ln_f(model.transformer.h[2].output)
    assert torch.allclose(lens, expected, atol=1e-5)
    assert not torch.allclose(expected, torch.nn.functional.layer_norm(h, (32,)), atol=1e-3)


def test_an_envoy_kept_from_before_its_module_was_removed_says_so():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model = nnpatch.Model(net)
    last = model[2]
    del net[2]
    with pytest.raises(nnpatch.NNPatchError, match=r"reading 2.output failed: NNPatchAttributeError: the model has no module '2'"):
        with model.trace(torch.ones(1, 3)):
            out = last.output  # noqa: F841
    assert all_hooks(net) == 0


def test_a_block_inserted_or_deleted_renumbers_the_paths():
    # ModuleList.insert and del write the list's _modules directly (no module registration):
    # "transformer.h.0" is the new block afterwards, and the old block 0 is "transformer.h.1"
    extra = gpt2(seed=7).transformer.h[0]  # built first: building registers modules
    hf = gpt2()
    model = traced_once(hf)
    with model.trace(A):
        first = model.transformer.h[0].output
    old0 = hf.transformer.h[0]
    hf.transformer.h.insert(0, extra)
    seen = {}
    handles = [extra.register_forward_hook(lambda m, a, o: seen.setdefault(0, o)),
               old0.register_forward_hook(lambda m, a, o: seen.setdefault(1, o))]
    with torch.no_grad():
        hf(ids(A), use_cache=False)  # two blocks with layer_idx 0 would share a KV cache layer
    for h in handles:
        h.remove()
    with model.trace(A):
        h0 = model.transformer.h[0].output
        h1 = model.transformer.h[1].output
    assert torch.allclose(h0, seen[0], atol=1e-6) and torch.allclose(h1, seen[1], atol=1e-6)
    assert not torch.allclose(h0, first, atol=1e-3)
    del hf.transformer.h[0]
    with model.trace(A):
        again = model.transformer.h[0].output
    assert torch.allclose(again, first, atol=1e-6)
