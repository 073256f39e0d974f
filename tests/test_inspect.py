"""attention_pattern, head_logit_attribution and logit_lens against hand-written plain PyTorch on
the same weights: attention from the q/k projections (and Hugging Face's eager output_attentions),
head attributions through a hand-frozen final norm, and the lens from block hooks."""
import math

import pytest
import torch

import nnpatch
from conftest import gpt2, llama, prompt, word_tokenizer
from nnpatch.sweep import patch_cells

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def ioi():
    return nnpatch.models.load("ioi")


@pytest.fixture(scope="module")
def table():
    return nnpatch.models.load("table-max")


def small(arch, **kw):
    hf = gpt2(**kw) if arch == "gpt2" else llama(**kw)
    return nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())


def layers_of(hf):
    return hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers


def tokens(lm, text):
    return torch.tensor([lm.to_tokens(text)])


def attn_input(hf, layer, ids):
    """The hidden state the attention module of `layer` reads (after its norm)."""
    block = layers_of(hf)[layer]
    attn = block.attn if hasattr(block, "attn") else block.self_attn
    seen = {}

    def pre(m, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"])[0].detach()
    h = attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        h.remove()
    return seen["x"]  # [pos, d]


def softmax_causal(scores):
    n = scores.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


@torch.no_grad()
def gpt2_pattern(hf, layer, head, ids):
    x = attn_input(hf, layer, ids)
    c = layers_of(hf)[layer].attn.c_attn
    qkv = x @ c.weight + c.bias  # Conv1D: [in, out]
    d = hf.config.n_embd
    hd = d // hf.config.n_head
    q, k = qkv[:, :d], qkv[:, d:2 * d]
    q, k = q[:, head * hd:(head + 1) * hd], k[:, head * hd:(head + 1) * hd]
    return softmax_causal(q @ k.T / math.sqrt(hd))


def rope(x, theta):  # x: [pos, hd]
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(x.shape[0]).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rotated = torch.cat([-x[:, hd // 2:], x[:, :hd // 2]], -1)
    return x * cos + rotated * sin


@torch.no_grad()
def llama_pattern(hf, layer, head, ids):
    x = attn_input(hf, layer, ids)
    attn = layers_of(hf)[layer].self_attn
    cfg = hf.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    q = (x @ attn.q_proj.weight.T)[:, head * hd:(head + 1) * hd]
    kv = head // group
    k = (x @ attn.k_proj.weight.T)[:, kv * hd:(kv + 1) * hd]
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return softmax_causal(rope(q, theta) @ rope(k, theta).T / math.sqrt(hd))


# -- attention_pattern ---------------------------------------------------------------------------
def test_pattern_of_the_bundled_models_equals_q_k_by_hand(ioi, table):
    for layer, head in [(0, 0), (2, 1), (3, 3)]:
        p = nnpatch.attention_pattern(ioi, CLEAN, layer, head)
        ref = gpt2_pattern(ioi.module, layer, head, tokens(ioi, CLEAN))
        assert p.weights.shape == (14, 14) and p.layer == layer and p.head == head
        assert torch.allclose(p.weights, ref, atol=1e-5), (layer, head)
        assert p.tokens == ioi.to_str_tokens(CLEAN)
    text = nnpatch.tasks.table_max(1)[0].clean
    for layer, head in [(0, 3), (3, 1)]:
        p = nnpatch.attention_pattern(table, text, layer, head)
        assert torch.allclose(p.weights, llama_pattern(table.module, layer, head, tokens(table, text)), atol=1e-5)
    # sdpa is back afterwards, and the model computes what it did before
    assert ioi.module.config._attn_implementation == "sdpa"
    assert table.module.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_pattern_equals_hf_output_attentions_with_heads_as_many_as_tokens(arch):
    lm = small(arch)
    text = prompt(3, 7, 7, 1)  # 4 tokens, 4 heads: a transposed [key, query] would go unnoticed by shape
    ids = tokens(lm, text)
    cls = type(lm.module)
    eager = cls._from_config(lm.module.config, attn_implementation="eager").eval()
    eager.load_state_dict(lm.module.state_dict())
    with torch.no_grad():
        want = eager(ids, output_attentions=True).attentions
    by_hand = gpt2_pattern if arch == "gpt2" else llama_pattern
    for layer in range(3):
        for head in range(4):
            got = nnpatch.attention_pattern(lm, text, layer, head).weights
            assert torch.allclose(got, want[layer][0, head], atol=1e-6), (layer, head)
            assert torch.allclose(got, by_hand(lm.module, layer, head, ids), atol=1e-5), (layer, head)
    assert not torch.allclose(want[0][0, 1], want[0][0, 1].T)  # the test can tell q from k


def test_one_token_prompt_attends_to_itself(ioi):
    p = nnpatch.attention_pattern(ioi, "When", 1, 2)
    assert p.tokens == ["When"] and p.weights.tolist() == [[1.0]]


def test_attention_is_restored_after_an_error(ioi):
    def boom(module, args, output):
        raise RuntimeError("boom")
    h = ioi.module.transformer.h[1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            nnpatch.attention_pattern(ioi, CLEAN, 0, 0)
    finally:
        h.remove()
    assert ioi.module.config._attn_implementation == "sdpa"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ioi.module.modules())


@pytest.mark.parametrize("kw, match", [(dict(layer=4, head=0), r"layer 4 .*4 layers \(0..3\)"),
                                       (dict(layer=0, head=-5), r"head -5 .*4 heads \(0..3\)"),
                                       (dict(layer=1.5, head=0), "layer must be an integer")])
def test_bad_layer_or_head_names_the_range(ioi, kw, match):
    with pytest.raises(nnpatch.NNPatchError, match=match):
        nnpatch.attention_pattern(ioi, CLEAN, **kw)


def test_pattern_needs_a_language_model(ioi):
    with pytest.raises(TypeError, match="LanguageModel"):
        nnpatch.attention_pattern(ioi.module, CLEAN, 0, 0)


# -- head_logit_attribution ------------------------------------------------------------------------
def dla_by_hand(lm, text, answer, wrong):
    """Per-head direct effects, and every other component's, by hand: returns (heads [L, H], rest, logit diff)."""
    hf = lm.module
    gpt = hasattr(hf, "transformer")
    blocks = layers_of(hf)
    norm = hf.transformer.ln_f if gpt else hf.model.norm
    seen, handles = {}, []

    def pre(key):
        def f(m, args, kwargs):
            seen[key] = (args[0] if args else kwargs["hidden_states"])[0, -1].detach().clone()
        return f

    def post(key):
        def f(m, args, out):
            seen[key] = (out[0] if isinstance(out, tuple) else out)[0, -1].detach().clone()
        return f
    for i, b in enumerate(blocks):
        attn = b.attn if gpt else b.self_attn
        proj = attn.c_proj if gpt else attn.o_proj
        handles += [proj.register_forward_pre_hook(pre(("z", i)), with_kwargs=True),
                    attn.register_forward_hook(post(("attn", i))), b.mlp.register_forward_hook(post(("mlp", i)))]
    handles += [blocks[0].register_forward_pre_hook(pre("embed"), with_kwargs=True),
                norm.register_forward_pre_hook(pre("x"), with_kwargs=True)]
    try:
        with torch.no_grad():
            logits = hf(tokens(lm, text)).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        return _dla_sums(hf, lm, seen, logits, answer, wrong, gpt, blocks, norm)


def _dla_sums(hf, lm, seen, logits, answer, wrong, gpt, blocks, norm):
    a, w = lm.to_tokens(answer)[0], lm.to_tokens(wrong)[0]
    u = hf.lm_head.weight  # [vocab, d]
    direction = u[a] - u[w]
    x = seen["x"]
    if gpt:
        s = torch.sqrt(x.var(unbiased=False) + norm.eps)
        frozen = lambda c: (c - c.mean()) / s * norm.weight  # noqa: E731
        bias = norm.bias @ direction
    else:
        s = torch.sqrt(x.pow(2).mean() + norm.variance_epsilon)
        frozen = lambda c: c / s * norm.weight  # noqa: E731
        bias = torch.tensor(0.0)
    n_heads = hf.config.num_attention_heads
    heads = torch.zeros(len(blocks), n_heads)
    rest = frozen(seen["embed"]) @ direction + bias
    total = seen["embed"].clone()
    for i, b in enumerate(blocks):
        proj = b.attn.c_proj if gpt else b.self_attn.o_proj
        w_o = proj.weight if gpt else proj.weight.T  # [heads * hd, d]
        hd = w_o.shape[0] // n_heads
        outs = [seen["z", i][h * hd:(h + 1) * hd] @ w_o[h * hd:(h + 1) * hd] for h in range(n_heads)]
        for h, c in enumerate(outs):
            heads[i, h] = frozen(c) @ direction
        rest = rest + frozen(seen["attn", i] - sum(outs)) @ direction + frozen(seen["mlp", i]) @ direction
        total = total + seen["attn", i] + seen["mlp", i]
    assert torch.allclose(total, x, atol=1e-4)  # the residual stream is the sum of its writers
    return heads, rest, float(logits[a] - logits[w])


@pytest.mark.parametrize("which", ["ioi", "table", "gpt2", "llama"])
def test_dla_equals_hand_computation_and_sums_to_the_logit_diff(which, ioi, table):
    if which == "ioi":
        lm, text, answer, wrong = ioi, CLEAN, " Mary", " John"
    elif which == "table":
        pair = nnpatch.tasks.table_max(1)[0]
        lm, text, answer, wrong = table, pair.clean, pair.answer, pair.wrong
    else:
        lm, text, answer, wrong = small(which), prompt(5, 9, 2, 14, 3), "t4", "t9"
    got = nnpatch.head_logit_attribution(lm, text, answer, wrong)
    heads, rest, diff = dla_by_hand(lm, text, answer, wrong)
    assert got.shape == heads.shape
    assert torch.allclose(got, heads, atol=1e-5, rtol=1e-4)
    assert float(got.abs().max()) > 1e-3
    assert math.isclose(float(got.sum() + rest), diff, rel_tol=1e-4, abs_tol=1e-4)


def test_dla_with_answer_equal_to_wrong_is_zero_and_one_token_prompts_work(ioi):
    assert nnpatch.head_logit_attribution(ioi, CLEAN, " Mary", " Mary").abs().max() == 0
    got = nnpatch.head_logit_attribution(ioi, "When", " Mary", " John")
    heads, rest, diff = dla_by_hand(ioi, "When", " Mary", " John")
    assert torch.allclose(got, heads, atol=1e-5) and math.isclose(float(got.sum() + rest), diff, abs_tol=1e-4)


def test_dla_bad_answer_says_so(ioi):
    with pytest.raises(ValueError, match="answer 'Mary and'"):
        nnpatch.head_logit_attribution(ioi, CLEAN, "Mary and", " John")


# -- logit_lens ------------------------------------------------------------------------------------
def lens_by_hand(lm, ids, edits=()):
    """Residual after the embeddings and after each block (with `edits` hooks attached first),
    through the final norm and unembedding: probs [rows, pos, vocab] and the real last logits."""
    hf = lm.module
    blocks = layers_of(hf)
    norm = hf.transformer.ln_f if hasattr(hf, "transformer") else hf.model.norm
    rows, handles = {}, [h() for h in edits]
    handles.append(blocks[0].register_forward_pre_hook(
        lambda m, a, k: rows.__setitem__(0, (a[0] if a else k["hidden_states"])[0].clone()), with_kwargs=True))
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_hook(
            lambda m, a, o, i=i: rows.__setitem__(i + 1, (o[0] if isinstance(o, tuple) else o)[0].clone())))
    try:
        with torch.no_grad():
            logits = hf(ids).logits[0]
            resid = torch.stack([rows[i] for i in range(len(blocks) + 1)])
            probs = hf.lm_head(norm(resid)).softmax(-1)
    finally:
        for h in handles:
            h.remove()
    return probs, logits


def check_lens(lens, probs, answer_id, decode):
    top_p, top_i = probs.max(-1)
    assert torch.allclose(lens.top_probs, top_p, atol=1e-5)
    assert lens.top_tokens == [[decode([i]) for i in row] for row in top_i.tolist()]
    if answer_id is not None:
        assert torch.allclose(lens.answer_probs, probs[..., answer_id], atol=1e-5)


@pytest.mark.parametrize("which", ["ioi", "table"])
def test_lens_equals_block_hooks_and_its_last_row_is_the_model(which, ioi, table):
    lm = ioi if which == "ioi" else table
    text, answer = (CLEAN, " Mary") if which == "ioi" else (nnpatch.tasks.table_max(1)[0].clean, " 74")
    lens = nnpatch.logit_lens(lm, text, answer)
    probs, logits = lens_by_hand(lm, tokens(lm, text))
    check_lens(lens, probs, lm.to_tokens(answer)[0], lm.tokenizer.decode)
    assert lens.layers == ["embed", "0", "1", "2", "3"] and lens.tokens == lm.to_str_tokens(text)
    assert torch.allclose(lens.top_probs[-1], logits.softmax(-1).max(-1).values, atol=1e-5)
    assert lens.patch == "" and lens.answer == answer


def test_lens_without_answer_and_of_one_token(ioi):
    lens = nnpatch.logit_lens(ioi, "When")
    assert lens.answer_probs is None and lens.top_probs.shape == (5, 1)
    probs, _ = lens_by_hand(ioi, tokens(ioi, "When"))
    check_lens(lens, probs, None, ioi.tokenizer.decode)


def record(module, pos, store):
    def pre(m, a, k):
        store["v"] = (a[0] if a else k["hidden_states"])[0].clone()
    return lambda: module.register_forward_pre_hook(pre, with_kwargs=True)


def test_patched_lens_equals_hand_patching_and_patch_cells(ioi):
    block = ioi.module.transformer.h[2]
    store = {}
    lens_by_hand(ioi, tokens(ioi, CLEAN), [record(block, -1, store)])  # the clean value at block 2's input

    def write():
        def pre(m, a, k):
            x = a[0].clone()
            x[0, 13] = store["v"][13]  # the last position, where layer 2 carries the answer
            return (x,) + a[1:], k
        return block.register_forward_pre_hook(pre, with_kwargs=True)
    probs, _ = lens_by_hand(ioi, tokens(ioi, CORRUPT), [write])
    mary = ioi.to_tokens(" Mary")[0]
    lens = nnpatch.logit_lens(ioi, CORRUPT, " Mary", patch=dict(source=CLEAN, site="resid_pre", cell=(2, 9)))
    # cell (2, 9) patches position 9; the hand patch above is position 13: they must differ ...
    assert float((lens.answer_probs - probs[..., mary]).abs().max()) > 0.1
    lens = nnpatch.logit_lens(ioi, CORRUPT, " Mary", patch=dict(source=CLEAN, site="resid_pre", cell=(2, -1)))
    check_lens(lens, probs, mary, ioi.tokenizer.decode)  # ... and here agree
    run = patch_cells(ioi, CLEAN, CORRUPT, [(2, 13)], site="resid_pre", answer=" Mary", wrong=" John")
    assert torch.allclose(lens.top_probs[-1, -1], run.patched_logits[0].softmax(-1).max(), atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_patched_lens_of_a_head_equals_hand_patching(arch):
    lm = small(arch)
    clean, corrupt = prompt(5, 9, 2, 14, 3), prompt(5, 11, 2, 14, 3)
    hf = lm.module
    attn = layers_of(hf)[1].attn if arch == "gpt2" else layers_of(hf)[1].self_attn
    proj = attn.c_proj if arch == "gpt2" else attn.o_proj
    store = {}
    lens_by_hand(lm, tokens(lm, clean), [record(proj, None, store)])
    hd = store["v"].shape[-1] // 4

    def write():
        def pre(m, a, k):
            x = a[0].clone()
            x[0, :, 2 * hd:3 * hd] = store["v"][:, 2 * hd:3 * hd]  # head 2, every position
            return (x,) + a[1:], k
        return proj.register_forward_pre_hook(pre, with_kwargs=True)
    probs, _ = lens_by_hand(lm, tokens(lm, corrupt), [write])
    lens = nnpatch.logit_lens(lm, corrupt, "t4", patch=dict(source=clean, site="head_out", cell=(1, 2)))
    check_lens(lens, probs, lm.to_tokens("t4")[0], lm.tokenizer.decode)
    plain = nnpatch.logit_lens(lm, corrupt, "t4")
    assert torch.equal(plain.top_probs[:2], lens.top_probs[:2])  # before layer 1's output: untouched
    assert float((plain.answer_probs[2:] - lens.answer_probs[2:]).abs().max()) > 1e-4  # the patch shows
    # (layer, head, pos) at the last position only: differs from every position
    one = nnpatch.logit_lens(lm, corrupt, "t4", patch=dict(source=clean, site="head_out", cell=(1, 2, 4)))
    assert torch.allclose(one.top_probs[:2], lens.top_probs[:2])  # rows before layer 1 are untouched
    assert one.patch == "head_out (layer 1, head 2, pos 4) from the source prompt"


def test_patched_lens_with_equal_prompts_is_the_plain_lens(ioi):
    plain = nnpatch.logit_lens(ioi, CLEAN, " Mary")
    same = nnpatch.logit_lens(ioi, CLEAN, " Mary", patch=dict(source=CLEAN, cell=(1, 3)))
    assert torch.equal(plain.top_probs, same.top_probs) and plain.top_tokens == same.top_tokens


@pytest.mark.parametrize("patch, error, match", [
    (dict(source=CLEAN, cell=(9, 0)), IndexError, r"layer 9 is out of range; the model has 4 layers"),
    (dict(source=CLEAN, cell=(0, 20)), IndexError, r"pos 20 is out of range"),
    (dict(cell=(0, 1)), TypeError, "'source'"),
    (dict(source=CLEAN, cell=(0, 1), sight="x"), TypeError, r"unknown keys \['sight'\]"),
    (dict(source="When Mary", cell=(0, 1)), ValueError, "tokens long"),
    (dict(source=CLEAN, cell=(0, 1, 2, 3)), ValueError, "has 4 indices"),
])
def test_bad_patch_says_what_is_wrong(ioi, patch, error, match):
    with pytest.raises(error, match=match):
        nnpatch.logit_lens(ioi, CORRUPT, patch=patch)


def other_arch(name):
    from transformers import GPTJConfig, GPTJForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    common = dict(vocab_size=60, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    hf = {"neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                           intermediate_size=64, max_position_embeddings=64, **common)),
          "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                        num_key_value_heads=2, intermediate_size=64,
                                                        max_position_embeddings=64, **common)),
          "gptj": lambda: GPTJForCausalLM(GPTJConfig(n_layer=2, n_embd=32, n_head=4, n_positions=64, rotary_dim=4, **common)),
          }[name]().eval()
    return nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())


@pytest.mark.parametrize("name", ["neox", "qwen2", "gptj"])
def test_other_architectures_pattern_and_lens_equal_hf(name):
    lm = other_arch(name)
    text = prompt(3, 5, 7, 9)
    ids = tokens(lm, text)
    eager = type(lm.module)._from_config(lm.module.config, attn_implementation="eager").eval()
    eager.load_state_dict(lm.module.state_dict())
    with torch.no_grad():
        want = eager(ids, output_attentions=True).attentions
        real = lm.module(ids).logits[0].softmax(-1)
    for layer, head in [(0, 1), (1, 2)]:
        assert torch.allclose(nnpatch.attention_pattern(lm, text, layer, head).weights, want[layer][0, head], atol=1e-6)
    if name == "gptj":  # no circuit graph, so no known final norm: the error says how to add one
        with pytest.raises(ValueError, match="logit_lens reads the final norm.*register_graph"):
            nnpatch.logit_lens(lm, text)
        return
    lens = nnpatch.logit_lens(lm, text, "t4")
    assert torch.allclose(lens.top_probs[-1], real.max(-1).values, atol=1e-5)
    assert torch.allclose(lens.answer_probs[-1], real[:, lm.to_tokens("t4")[0]], atol=1e-5)
