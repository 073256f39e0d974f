"""Standard sites per architecture: each site's tensor is what its name claims.

Random-weight models of every supported architecture are built from configs; one forward pass
records every site with plain hooks, and the residual-stream identities are checked: resid_post
of layer L is resid_pre of layer L+1, the sublayer outputs add up to the next residual, and each
head's output, concatenated and sent through the output projection, is the attention output.
"""
from types import SimpleNamespace

import pytest
import torch
import transformers as T

import nnpatch
from conftest import hook, patching_reference, site_places, sweep_cells
from nnpatch.patching.sites import Site

V = 80


def configs():
    small = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=V)
    return {
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=V, n_positions=32)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(num_hidden_layers=3, max_position_embeddings=32, **small)),
        "gpt_neox_sequential": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            num_hidden_layers=3, max_position_embeddings=32, use_parallel_residual=False, **small)),
        "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(n_layer=3, n_embd=32, n_head=4, vocab_size=V, rotary_dim=4,
                                                       n_positions=32)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, **small)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(num_hidden_layers=3, num_key_value_heads=2, **small)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_hidden_layers=3, num_key_value_heads=2, **small)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
                                                          **small)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(num_hidden_layers=3, num_key_value_heads=2, head_dim=8,
                                                             sliding_window=4, **small)),
        "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(num_hidden_layers=3, num_key_value_heads=2,
                                                                 head_dim=8, sliding_window=16, **small)),
        "bert": lambda: T.BertForMaskedLM(T.BertConfig(num_hidden_layers=3, max_position_embeddings=32, **small)),
    }


def build(name):
    torch.manual_seed(0)
    return configs()[name]().eval()


pytestmark = pytest.mark.usefixtures("one_thread")


def record(model, table):
    """Every site's value in one forward pass, read with plain hooks."""
    seen, handles = {}, []
    for name, per_layer in table.items():
        for site in per_layer:
            handles.append(hook(model.get_submodule(site.path), site.kind,
                                lambda v, key=(name, site.layer): seen.__setitem__(key, v)))
    try:
        with torch.no_grad():
            model(torch.tensor([[3, 4, 5, 6, 7, 8], [9, 4, 10, 11, 7, 12]]))
    finally:
        for h in handles:
            h.remove()
    return seen


def same(a, b):
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


SEQUENTIAL = ["gpt2", "gpt_neox_sequential", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3"]
PARALLEL = ["gpt_neox", "gptj"]


@pytest.mark.parametrize("name", SEQUENTIAL + PARALLEL + ["bert"])
def test_sites_are_what_they_claim(name):
    model = build(name)
    table = nnpatch.sites(model)
    n = table.n_layers
    assert n == 3 and table.n_heads == 4
    assert all(s.heads == 4 for s in table["head_out"]) and table["mlp_out"][0].heads is None
    v = record(model, table)
    assert len(v) == len(table) * n

    for layer in range(n - 1):
        same(v["resid_post", layer], v["resid_pre", layer + 1])
    for layer in range(n):
        pre, post, attn, mlp = (v[k, layer] for k in ("resid_pre", "resid_post", "attn_out", "mlp_out"))
        block = model.get_submodule(f"{table.blocks}.{layer}")
        if name in SEQUENTIAL:
            same(pre + attn, v["resid_mid", layer])
            same(v["resid_mid", layer] + mlp, post)
        elif name in PARALLEL:
            assert "resid_mid" not in table
            same(pre + attn + mlp, post)
        else:  # BERT: post-norm
            same(block.attention.output.LayerNorm(attn + pre), v["resid_mid", layer])
            same(block.output.LayerNorm(mlp + v["resid_mid", layer]), post)

        head_site = table["head_out"][layer]
        projection = model.get_submodule(head_site.path)
        heads = v["head_out", layer]
        parts = heads.reshape(*heads.shape[:-1], 4, -1)  # [batch, pos, head, head_dim]
        assert parts.shape[-1] * 4 == heads.shape[-1]
        recombined = projection(parts.flatten(-2))
        if name in ("gemma2", "gemma3"):  # these normalise the projected heads before the residual
            recombined = block.post_attention_layernorm(recombined)
        same(recombined, attn)


def test_site_strings_and_table():
    model = build("gpt2")
    table = nnpatch.sites(model)
    assert str(table["head_out"][2]) == "transformer.h.2.attn.c_proj.input"
    assert str(table["resid_post"][0]) == "transformer.h.0.output"
    assert table.base == "transformer" and table.unembed == "lm_head" and table.kv_cache
    assert ("resid_mid   transformer.h.{layer}.ln_2.input  (= transformer.h.{layer}.input + "
            "transformer.h.{layer}.attn.output)") in repr(table)
    mid = table["resid_mid"][1]
    assert (str(mid.stream), str(mid.via)) == ("transformer.h.1.input", "transformer.h.1.attn.output")
    assert str(Site("model.layers.1.self_attn", "output", 1)) == "model.layers.1.self_attn.output[1]"
    assert list(nnpatch.sites(build("llama"))) == ["resid_pre", "resid_mid", "resid_post", "attn_out",
                                                  "mlp_out", "head_out"]
    bert = nnpatch.sites(build("bert"))
    assert bert.blocks == "bert.encoder.layer" and bert.unembed == "cls" and not bert.kv_cache


def test_unavailable_site_lists_the_available_ones():
    table = nnpatch.sites(build("gptj"))
    with pytest.raises(nnpatch.NNPatchError, match="'resid_mid' is not available for gptj.*Available sites: "
                                                   "resid_pre, resid_post, attn_out, mlp_out, head_out"):
        table["resid_mid"]


class TinyNet(torch.nn.Module):
    """A plain torch language model: embedding, residual MLP blocks, unembedding."""

    def __init__(self, d=16, vocab=20, n=3):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"ffn": torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh())}) for _ in range(n))
        self.mix = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.layers:
            x = x + block["ffn"](x)
            x = x + self.mix(x).cumsum(1) * 0.1  # positions mix, causally
        return self.head(x)


def test_register_sites_for_a_new_architecture():
    torch.manual_seed(0)
    net = TinyNet().eval()
    with pytest.raises(nnpatch.NNPatchError, match="register_sites"):
        nnpatch.sites(net)
    nnpatch.register_sites("TinyNet", blocks="layers", sites={"ffn_out": "ffn.output", "ffn_in": "ffn.input"})
    table = nnpatch.sites(net)
    assert [str(s) for s in table["ffn_out"]] == ["layers.0.ffn.output", "layers.1.ffn.output", "layers.2.ffn.output"]
    assert table.base is None  # no separate unembedding: sweeps run the whole model

    clean, corrupt = [[1, 2, 3, 4]], [[1, 5, 3, 4]]
    got = nnpatch.activation_patching(net, clean, corrupt, answer=7, wrong=8, site="ffn_out", progress=False)
    # The shared plain-hook reference, one forward per cell, with the path written out.
    raw = patching_reference(net, site_places(net, {"ffn_out": "layers.{i}.ffn.output"}, n_layers=3), clean, corrupt,
                             sweep_cells(("layer", "pos"), {"layer": 3, "pos": 4}), site="ffn_out", answer=7,
                             wrong=8, metric="logit_diff_raw").scores.reshape(3, 4)
    for layer in range(3):
        for pos in range(4):
            want = (float(raw[layer, pos]) - got.corrupt_score) / (got.clean_score - got.corrupt_score)
            assert float(got.values[layer, pos]) == pytest.approx(want, abs=1e-4)


def test_bad_registrations_say_what_to_write():
    with pytest.raises(nnpatch.NNPatchError, match="ends in 'input' or 'output'"):
        nnpatch.register_sites("Broken", blocks="layers", sites={"x": "ffn.outptu"})
    nnpatch.register_sites("TinyNet", blocks="layers", sites={"x": "fnn.output"})
    try:
        with pytest.raises(nnpatch.NNPatchError, match="'layers.0.fnn'.*closest: layers.0.ffn"):
            nnpatch.sites(TinyNet())
    finally:
        nnpatch.register_sites("TinyNet", blocks="layers", sites={"ffn_out": "ffn.output"})
