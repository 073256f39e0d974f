""".source: values inside a module's forward, against a hand-computed attention and plain hooks."""
import math

import pytest
import torch

import nnpatch
from conftest import all_hooks, blocks, close, gpt2, ids, prompt, word_tokenizer


@pytest.fixture
def hf():
    module = gpt2()
    module.config._attn_implementation = "eager"
    return module


@pytest.fixture
def lm(hf):
    return nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())


def untouched(hf):
    return all_hooks(hf) == 0 and not any("forward" in m.__dict__ for m in hf.modules())


def attention_weights(hf, text, layer):
    """softmax(q k^T / sqrt(head_dim)) with the causal mask, from layer's own weights."""
    seen = {}
    attn = blocks(hf)[layer].attn
    handle = attn.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", (a[0] if a else k["hidden_states"]).clone()),
                                            with_kwargs=True)
    with torch.no_grad():
        hf(ids(text))
    handle.remove()
    x = seen["x"]  # [batch, pos, d_model]
    q, k, _ = attn.c_attn(x).split(attn.split_size, dim=2)
    heads = hf.config.n_head
    q = q.view(*q.shape[:2], heads, -1).transpose(1, 2)
    k = k.view(*k.shape[:2], heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [batch, heads, query, key]
    n = x.shape[1]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def test_the_attention_weights_equal_a_hand_computed_softmax(lm, hf):
    text = prompt(3, 5, 7, 9, 11)
    with lm.trace(text):
        weights = lm.transformer.h[1].attn.source.attention_interface_1.output[1].save()
    assert close(weights, attention_weights(hf, text, 1))
    assert untouched(hf)


def test_each_invoke_reads_its_own_positions(lm, hf):
    long, one = prompt(3, 5, 7, 9, 11), prompt(3)  # the one-token prompt is left-padded
    with lm.trace() as tracer:
        with tracer.invoke(long):
            a = lm.transformer.h[0].attn.source.attention_interface_1.output[1].save()
        with tracer.invoke(one):
            b = lm.transformer.h[0].attn.source.attention_interface_1.output[1].save()
    assert close(a, attention_weights(hf, long, 0))
    assert b.shape == (1, 4, 1, 1) and close(b, attention_weights(hf, one, 0))


def test_editing_an_operation_changes_what_follows(lm, hf):
    text = prompt(12, 13, 14)
    with lm.trace(text):
        act = lm.transformer.h[1].mlp.source.self_act_0
        before = act.output.clone()
        act.output[:, -1] = 0
        mlp_out = lm.transformer.h[1].mlp.output.save()
        logits = lm.output.logits.save()
    seen = {}
    mlp = blocks(hf)[1].mlp

    def zero_last(m, a, o):
        seen["act"] = o.clone()
        o = o.clone()
        o[:, -1] = 0
        return o
    handles = [mlp.act.register_forward_hook(zero_last),
               mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o.clone()))]
    try:
        with torch.no_grad():
            want = hf(ids(text)).logits
    finally:
        for h in handles:
            h.remove()
    assert close(before, seen["act"]) and close(mlp_out, seen["mlp"]) and close(logits, want)
    assert untouched(hf)


def test_assigning_an_operation_and_reading_a_bound_name(lm, hf):
    text = prompt(20, 21)
    with lm.trace(text):
        lm.transformer.h[0].mlp.source.hidden_states_1.output = lm.transformer.h[0].mlp.source.hidden_states_0.output
        logits = lm.output.logits.save()
    mlp = blocks(hf)[0].mlp
    handle = mlp.act.register_forward_hook(lambda m, a, o: a[0])  # the activation skipped
    with torch.no_grad():
        want = hf(ids(text)).logits
    handle.remove()
    assert close(logits, want)


def test_listing_and_unknown_names(lm, hf):
    names = lm.transformer.h[0].mlp.source.names
    assert names == ["self_c_fc_0", "hidden_states_0", "self_act_0", "hidden_states_1",
                     "self_c_proj_0", "hidden_states_2", "self_dropout_0", "hidden_states_3"]
    listing = repr(lm.transformer.h[0].attn.source)
    assert "attention_interface_1" in listing and "line" in listing
    with pytest.raises(AttributeError, match="did you mean self_act_0"):
        with lm.trace(prompt(1, 2)):
            lm.transformer.h[0].mlp.source.self_actt_0.output
    assert untouched(hf)


def test_an_error_inside_the_instrumented_forward_leaves_nothing(lm, hf):
    with pytest.raises(ValueError, match="cannot set"):
        with lm.trace(prompt(1, 2)):
            lm.transformer.h[0].mlp.source.self_act_0.output = torch.zeros(7)
    assert untouched(hf)
    with torch.no_grad():  # the module's own forward is back
        assert type(blocks(hf)[0].mlp).forward is blocks(hf)[0].mlp.forward.__func__


def test_source_in_a_scan_gives_shapes(lm, hf):
    with lm.scan(prompt(1, 2, 3)):
        shape = lm.transformer.h[0].attn.source.attention_interface_1.output[1].shape
    assert shape == (1, 4, 3, 3) and untouched(hf)


def test_a_module_without_python_source_is_a_clear_error():
    namespace: dict = {}
    exec("import torch\nclass Doubler(torch.nn.Module):\n    def forward(self, x):\n        return x * 2\n",
         namespace)
    net = nnpatch.Model(namespace["Doubler"]())
    with pytest.raises(nnpatch.NNPatchError, match="Doubler.forward has no Python source"):
        net.source
