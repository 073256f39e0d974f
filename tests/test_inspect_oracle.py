"""The workbench's inspection functions tied to nnsight's numbers.

`logit_lens`, `attention_pattern`, `head_logit_attribution` and `noise_patching` run the model
with their own hooks (the last through the batched sweep), not through a trace.
tests/test_inspect.py checks them against hand-written references; here they are compared with
programs of the differential corpus (tests/nnsight_programs.py) run on nnpatch, on the same
weights. tests/test_nnsight_differential.py checks that those programs give nnsight 0.8.1's
values, so the functions agree with nnsight as well. Like that module, this one needs nnsight
installed (it runs where the differential test runs).
"""
import math

import pytest
import torch

import nnpatch
from nnsight_programs import (NOISE_STD, NOISE_SUBJECT, attn_weights_read, edit_causal_trace_with_noise,
                              read_head_direct_logit_attribution, read_logit_lens)
from test_nnsight_differential import build

TOL = 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logit_lens_rows_equal_the_corpus_programs_lens(kind):
    model, S, _ = build(kind, "nnpatch")
    want = read_logit_lens(model, S)  # softmax(lm_head(norm(block i output)))[:, -1], nnsight's numbers
    lens = nnpatch.logit_lens(model, S.A, S.ANS)
    assert lens.layers == ["embed"] + [str(i) for i in range(S.n)]
    for i in range(S.n):
        probs = want[f"lens{i}"][0]  # [vocab] at the last position
        assert torch.allclose(lens.top_probs[i + 1, -1], probs.max(), atol=TOL, rtol=TOL), (kind, i)
        assert torch.allclose(lens.answer_probs[i + 1, -1], probs[S.ANS], atol=TOL, rtol=TOL), (kind, i)
        assert lens.top_tokens[i + 1][-1] == S.tokenizer.decode([int(probs.argmax())]), (kind, i)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "ioi"])
def test_head_logit_attribution_equals_the_corpus_programs_direct_effects(kind):
    model, S, _ = build(kind, "nnpatch")
    want = read_head_direct_logit_attribution(model, S)["dla"]  # [layers, heads], nnsight's reads
    got = nnpatch.head_logit_attribution(model, S.A, S.ANS, S.WRONG)
    assert got.shape == want.shape == (S.n, S.heads), kind
    assert want.abs().max() > 1e-3, kind  # the heads do something on these weights
    assert torch.allclose(got, want, atol=TOL, rtol=1e-4), (kind, (got - want).abs().max())


@pytest.mark.parametrize("kind", ["gpt2e", "llamae"])
def test_attention_pattern_equals_the_corpus_programs_weights(kind):
    model, S, _ = build(kind, "nnpatch")
    want = attn_weights_read(model, S)  # layer 0's weights [1, heads, T, T]; layer 2's last query
    for head in range(S.heads):
        first = nnpatch.attention_pattern(model, S.A, 0, head).weights
        last = nnpatch.attention_pattern(model, S.A, 2, head).weights
        assert first.shape == want["w0"].shape[2:], kind
        assert torch.allclose(first, want["w0"][0, head].float(), atol=TOL, rtol=TOL), (kind, head)
        assert torch.allclose(last[-1], want["w2"][0, head].float(), atol=TOL, rtol=TOL), (kind, head)


def test_attention_pattern_of_a_model_running_sdpa_equals_eager_weights():
    """The corpus reads weights from eager attention; attention_pattern switches an sdpa model
    to eager for its one forward: the same weights, and the model is back on sdpa afterwards."""
    eager_model, S, digest = build("gpt2e", "nnpatch")
    sdpa_model, _, same = build("gpt2", "nnpatch")
    assert digest == same  # the same weights, built with another attention implementation
    want = attn_weights_read(eager_model, S)["w0"]
    before = sdpa_model.module.config._attn_implementation
    for head in range(S.heads):
        got = nnpatch.attention_pattern(sdpa_model, S.A, 0, head).weights
        assert torch.allclose(got, want[0, head].float(), atol=TOL, rtol=TOL), head
    assert sdpa_model.module.config._attn_implementation == before


@pytest.mark.parametrize("kind", ["gpt2", "llama", "ioi"])
def test_noise_patching_equals_the_corpus_programs_causal_trace(kind):
    model, S, _ = build(kind, "nnpatch")
    traced = edit_causal_trace_with_noise(model, S)  # one trace per cell, nnsight's numbers

    def diff(logits):
        return float((logits[0, S.ANS] - logits[0, S.WRONG]).detach())
    clean, noisy = diff(traced["clean"]), diff(traced["noisy"])
    assert clean != noisy, kind
    r = nnpatch.noise_patching(model, S.A, subject=NOISE_SUBJECT, noise=NOISE_STD, seed=0,
                               answer=S.ANS, wrong=S.WRONG, progress=False)
    assert r.dims == ("layer", "pos") and r.values.shape == (S.n, S.len(S.A)), kind
    assert math.isclose(r.clean_score, clean, rel_tol=TOL, abs_tol=TOL), kind
    assert math.isclose(r.corrupt_score, noisy, rel_tol=TOL, abs_tol=TOL), kind
    # Compared as scores (the grid is normalised: (score - noisy) / (clean - noisy), and on the
    # random-weight models the noise moves the score by only ~0.001-0.004, which the division
    # would magnify); the trained ioi model moves it by whole logits.
    for i in range(S.n):
        for pos in range(S.len(S.A)):
            score = float(r.values[i, pos]) * (clean - noisy) + noisy
            want = diff(traced[f"layer{i}_pos{pos}"])
            assert math.isclose(score, want, rel_tol=TOL, abs_tol=TOL), (kind, i, pos, score, want)
