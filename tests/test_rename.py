"""rename={...}: aliases reach the module's own envoy (its real path), in traces, caches and
skips; aliases that would hide a name are errors."""
import pytest
import torch

import nnpatch
from conftest import all_hooks, blocks, close, first, gpt2, ids, llama, prompt, word_tokenizer

# One dict for both architectures: keys that do not resolve on a model are skipped.
RENAME = {"transformer.h": "layers", "model.layers": "layers", "attn": "attention",
          "self_attn": "attention", "mlp.c_proj": "mlp.down", "mlp.down_proj": "mlp.down"}


@pytest.fixture(params=["gpt2", "llama"])
def hf(request):
    return {"gpt2": gpt2, "llama": llama}[request.param]()


@pytest.fixture
def lm(hf):
    return nnpatch.LanguageModel(hf, tokenizer=word_tokenizer(), rename=RENAME)


def test_aliases_reach_the_real_envoys(lm, hf):
    gpt = hasattr(hf, "transformer")
    real = lm.transformer.h if gpt else lm.model.layers
    assert lm.layers[1] is real[1]
    assert lm.layers[1].attention is (real[1].attn if gpt else real[1].self_attn)
    assert lm.layers[2].mlp.down is (real[2].mlp.c_proj if gpt else real[2].mlp.down_proj)
    assert lm.layers[0]._path == ("transformer.h.0" if gpt else "model.layers.0")
    assert len(lm.layers) == 3 and [e._path for e in lm.layers] == [e._path for e in real]


def test_a_trace_through_aliases_equals_the_hooks(lm, hf):
    text = prompt(3, 4, 5, 6)
    with lm.trace(text) as tracer:
        cache = tracer.cache(modules=["layers.2", lm.layers[0].attention])
        attn = lm.layers[0].attention.output[0].save()
        lm.layers[1].output[:] *= 0.5
        lm.layers[2].mlp.down.skip(lm.layers[2].mlp.down.input[..., :32] * 0)
        logits = lm.output.logits.save()
    gpt = hasattr(hf, "transformer")
    seen = {}
    attn_module = blocks(hf)[0].attn if gpt else blocks(hf)[0].self_attn
    down = blocks(hf)[2].mlp.c_proj if gpt else blocks(hf)[2].mlp.down_proj
    handles = [attn_module.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0].clone())),
               blocks(hf)[1].register_forward_hook(lambda m, a, o: first(o) * 0.5),
               down.register_forward_hook(lambda m, a, o: torch.zeros_like(o)),
               blocks(hf)[2].register_forward_hook(lambda m, a, o: seen.__setitem__(2, first(o).clone()))]
    try:
        with torch.no_grad():
            want = hf(ids(text)).logits
    finally:
        for h in handles:
            h.remove()
    assert close(attn, seen["attn"]) and close(logits, want)
    path2 = "transformer.h.2" if gpt else "model.layers.2"
    assert close(cache[path2].output, seen[2]) and close(cache["layers.2"].output, seen[2])
    assert close(cache.layers[2].output, seen[2])
    assert all_hooks(hf) == 0


def test_aliases_that_hide_a_name_are_errors(hf):
    tok = word_tokenizer()
    for rename, hidden in [({"transformer.h": "output", "model.layers": "output"}, "output"),
                           ({"lm_head": "config"}, "config"),
                           ({"h": "wte", "layers": "norm"}, None)]:
        with pytest.raises(ValueError, match="would hide") as info:
            nnpatch.LanguageModel(hf, tokenizer=tok, rename=rename)
        assert hidden is None or repr(hidden) in str(info.value)
    with pytest.raises(TypeError, match="rename= takes a dict"):
        nnpatch.LanguageModel(hf, tokenizer=tok, rename=["layers"])
    with pytest.raises(ValueError, match="dotted alias"):
        nnpatch.LanguageModel(hf, tokenizer=tok, rename={"mlp.c_proj": "attn.o", "mlp.down_proj": "attn.o"})


def test_an_unknown_alias_says_what_there_is(lm, hf):
    with pytest.raises(AttributeError, match="did you mean"):
        lm.layerz
    plain = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    with pytest.raises(AttributeError):
        plain.layers
