"""Attribution patching against plain torch.autograd: retain_grad on hooked tensors, one backward."""
import pytest
import torch

import nnpatch
from conftest import all_hooks, hook
from test_sweep import ANSWER, BUILD, CLEAN, CORRUPT, WRONG, close, places

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(hf, site, by, direction, metric="logit_diff", clean=CLEAN, corrupt=CORRUPT):
    n_layers, n_heads = hf.config.num_hidden_layers, hf.config.num_attention_heads
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    rows = torch.arange(len(clean))
    at = places(hf)  # the hand-written site table of test_sweep

    def run(prompts, keep_grad):
        store, handles = {}, []
        for layer in range(n_layers):
            def keep(x, layer=layer):
                if keep_grad:
                    x.retain_grad()
                store[layer] = x
            handles.append(hook(*at[site, layer][:2], keep))
        try:
            logits = hf(torch.tensor(prompts)).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        return logits, store

    def score(logits):
        if metric == "prob":
            return logits.softmax(-1)[rows, ANSWER].mean()
        return (logits[rows, ANSWER] - logits[rows, WRONG]).mean()

    with torch.no_grad():
        _, src = run(source, False)
        clean_score = float(score(hf(torch.tensor(clean)).logits[:, -1]))
        corrupt_score = float(score(hf(torch.tensor(corrupt)).logits[:, -1]))
    logits, acts = run(base, True)
    base_score = score(logits)
    base_score.backward()
    out = []
    for layer in range(n_layers):
        x = (src[layer] - acts[layer].detach()) * acts[layer].grad  # [pair, pos, d]
        if "head" in by:
            x = x.reshape(*x.shape[:-1], n_heads, -1).sum(-1).sum(0)  # [pos, head]
            x = x.T if "pos" in by else x.sum(0)
        else:
            x = x.sum(-1).sum(0)
            x = x if "pos" in by else x.sum()
        out.append(x + float(base_score.detach()))
    values = torch.stack(out)
    if metric == "logit_diff":
        values = (values - corrupt_score) / (clean_score - corrupt_score)
    return values, clean_score, corrupt_score


CASES = [("resid_pre", ("layer", "pos")), ("attn_out", ("layer",)), ("mlp_out", ("layer", "pos")),
         ("resid_mid", ("layer", "pos")), ("head_out", ("layer", "head")), ("head_out", ("layer", "head", "pos"))]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("site,by", CASES)
def test_attribution_matches_autograd(arch, site, by):
    for direction in ("denoise", "noise"):
        hf = BUILD[arch]()
        want, clean, corrupt = reference(hf, site, by, direction)
        hf.zero_grad(set_to_none=True)
        got = nnpatch.attribution_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, site=site, by=by,
                                           direction=direction, progress=False)
        assert got.method == "attribution" and got.dims == by
        close(got.values, want)
        assert got.clean_score == pytest.approx(clean, abs=1e-5)
        assert got.corrupt_score == pytest.approx(corrupt, abs=1e-5)
        assert all_hooks(hf) == 0
        assert all(p.grad is None for p in hf.parameters())  # no weight gradients were accumulated


def test_attribution_with_prob_and_a_custom_metric():
    hf = BUILD["gpt2"]()
    want, _, _ = reference(hf, "attn_out", ("layer", "pos"), "denoise", metric="prob")
    got = nnpatch.attribution_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, site="attn_out",
                                       metric="prob", progress=False)
    close(got.values, want)

    def prob_of_answers(logits):  # the same metric, as a function
        return logits.softmax(-1)[torch.arange(2), ANSWER].mean()
    custom = nnpatch.attribution_patching(hf, CLEAN, CORRUPT, site="attn_out", metric=prob_of_answers,
                                          progress=False)
    close(custom.values, want)


def test_attribution_of_a_frozen_model():
    hf = BUILD["llama"]()
    want, _, _ = reference(hf, "resid_pre", ("layer", "pos"), "denoise")
    hf.requires_grad_(False)  # the estimate must not depend on the parameters wanting gradients
    got = nnpatch.attribution_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, progress=False)
    close(got.values, want)


def test_attribution_is_exact_where_patching_is_linear():
    # Patching resid_post of the last layer feeds the final norm and unembedding only; with the
    # logit difference of a patch at the last position it agrees with activation patching to
    # first order, and exactly where clean and corrupt agree.
    hf = BUILD["gpt2"]()
    kw = dict(answer=ANSWER, wrong=WRONG, site="resid_post", progress=False)
    act = nnpatch.activation_patching(hf, CLEAN, CORRUPT, **kw)
    atp = nnpatch.attribution_patching(hf, CLEAN, CORRUPT, **kw)
    assert torch.allclose(act.values[:, :2], atp.values[:, :2], atol=1e-6)  # positions 0-1 agree exactly
    assert torch.corrcoef(torch.stack([act.values.flatten(), atp.values.flatten()]))[0, 1] > 0.5
