"""Sweeps against a naive reference: one plain-PyTorch forward per cell and pair, hooks written out.

The models are random-weight GPT-2 and Llama configs with a wide initialisation, so that logit
differences are of order one and a normalised difference of 1e-4 means a real error.
"""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import nnpatch
from conftest import all_hooks, last_logits, patching_reference, site_places, sweep_cells
from nnpatch.sweep import patch_cells

VOCAB = 60
CLEAN = [[5, 6, 7, 8, 9, 10, 11], [12, 6, 7, 13, 9, 14, 11]]
CORRUPT = [[5, 6, 20, 8, 9, 10, 11], [12, 6, 21, 13, 22, 14, 11]]
ANSWER, WRONG = [3, 4], [4, 30]


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                                      initializer_range=0.2)).eval()


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        initializer_range=0.2)).eval()


BUILD = {"gpt2": gpt2, "llama": llama}


pytestmark = pytest.mark.usefixtures("one_thread")


# Where each site is, written out by hand (not read from nnpatch's site table).
PATHS = {
    "gpt2": {"resid_pre": "transformer.h.{i}.input",
             "resid_mid": "transformer.h.{i}.ln_2.input = transformer.h.{i}.input + transformer.h.{i}.attn.output",
             "resid_post": "transformer.h.{i}.output", "attn_out": "transformer.h.{i}.attn.output",
             "mlp_out": "transformer.h.{i}.mlp.output", "head_out": "transformer.h.{i}.attn.c_proj.input"},
    "llama": {"resid_pre": "model.layers.{i}.input",
              "resid_mid": "model.layers.{i}.post_attention_layernorm.input = "
                           "model.layers.{i}.input + model.layers.{i}.self_attn.output",
              "resid_post": "model.layers.{i}.output", "attn_out": "model.layers.{i}.self_attn.output",
              "mlp_out": "model.layers.{i}.mlp.output", "head_out": "model.layers.{i}.self_attn.o_proj.input"},
}


def places(hf):
    return site_places(hf, PATHS["gpt2" if isinstance(hf, GPT2LMHeadModel) else "llama"])


def naive(hf, site, by, direction, metric="logit_diff", clean=CLEAN, corrupt=CORRUPT,
          answer=ANSWER, wrong=WRONG, cells=None):
    """The shared plain-hook reference. Returns (values, clean score, corrupt score)."""
    if cells is None:
        shape = {"layer": hf.config.num_hidden_layers, "head": hf.config.num_attention_heads, "pos": len(clean[0])}
        cells = sweep_cells(by, shape)
    ref = patching_reference(hf, places(hf), clean, corrupt, cells, site=site, answer=answer, wrong=wrong,
                             metric=metric, direction=direction)
    return ref.values, ref.clean_score, ref.corrupt_score


def close(got, want, tol=1e-4):
    got, want = torch.as_tensor(got, dtype=torch.float64).flatten(), torch.as_tensor(want, dtype=torch.float64).flatten()
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"max error {err}"


SWEEPS = [(site, by) for site in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
          for by in [("layer",), ("layer", "pos")]]
SWEEPS += [("head_out", by) for by in [("layer",), ("layer", "pos"), ("layer", "head"), ("layer", "head", "pos")]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("site,by", SWEEPS)
def test_activation_patching_matches_naive_loop(arch, site, by):
    hf = BUILD[arch]()
    for direction in ("denoise", "noise"):
        want, clean, corrupt = naive(hf, site, by, direction)
        # A small batch so that chunks mix layers and positions.
        got = nnpatch.activation_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, site=site, by=by,
                                          direction=direction, batch_size=5, progress=False)
        assert got.dims == by and got.direction == direction
        close(got.values, want)
        assert got.clean_score == pytest.approx(clean, abs=1e-4)
        assert got.corrupt_score == pytest.approx(corrupt, abs=1e-4)
    assert all_hooks(hf) == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_default_batching_matches_too(arch):
    hf = BUILD[arch]()
    want, _, _ = naive(hf, "resid_pre", ("layer", "pos"), "denoise")
    got = nnpatch.activation_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, progress=False)
    close(got.values, want)


@pytest.mark.parametrize("metric", ["logit_diff_raw", "prob", "kl"])
def test_other_metrics(metric):
    hf = gpt2()
    for direction in ("denoise", "noise"):
        want, clean, corrupt = naive(hf, "attn_out", ("layer", "pos"), direction, metric)
        got = nnpatch.activation_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, site="attn_out",
                                          metric=metric, direction=direction, progress=False)
        close(got.values, want)
        assert got.clean_score == pytest.approx(clean, abs=1e-5)
        assert got.corrupt_score == pytest.approx(corrupt, abs=1e-5)


def test_callable_metric_sees_all_pairs():
    hf = llama()
    seen = []

    def top_margin(logits):  # [n_pairs, vocab]
        seen.append(tuple(logits.shape))
        return (logits[0, 3] - logits[1, 30]) * 0.5

    got = nnpatch.activation_patching(hf, CLEAN, CORRUPT, metric=top_margin, site="mlp_out", by=("layer",),
                                      progress=False)
    assert set(seen) == {(2, VOCAB)}
    want = patching_reference(hf, places(hf), CLEAN, CORRUPT, [[{"layer": layer}] for layer in range(3)],
                              site="mlp_out", metric=top_margin).values
    close(got.values, want)


def test_pairs_of_different_lengths_average_by_layer():
    hf = gpt2()
    clean = [CLEAN[0], CLEAN[1][:5]]
    corrupt = [CORRUPT[0], CORRUPT[1][:5]]
    want, _, _ = naive(hf, "resid_post", ("layer",), "denoise", clean=clean, corrupt=corrupt)
    got = nnpatch.activation_patching(hf, clean, corrupt, answer=ANSWER, wrong=WRONG, site="resid_post",
                                      by=("layer",), progress=False)
    close(got.values, want)
    with pytest.raises(nnpatch.NNPatchError, match=r"\[5, 7\] tokens"):
        nnpatch.activation_patching(hf, clean, corrupt, answer=ANSWER, wrong=WRONG, progress=False)


def test_patch_cells_patches_a_set_together():
    hf = llama()
    cells = [(0, 2), (1, 4), (2, 6)]
    want, clean, corrupt = naive(hf, "attn_out", ("layer", "pos"), "denoise",
                                 cells=[[{"layer": l, "pos": p} for l, p in cells]])
    got = patch_cells(hf, CLEAN, CORRUPT, cells, site="attn_out", answer=ANSWER, wrong=WRONG)
    close(got.score, want)
    assert got.clean_score == pytest.approx(clean, abs=1e-5)
    assert got.corrupt_score == pytest.approx(corrupt, abs=1e-5)
    assert got.patched_score == pytest.approx(corrupt + float(want) * (clean - corrupt), abs=1e-4)
    assert got.patched_logits.shape == got.clean_logits.shape == (2, VOCAB)
    close(got.clean_logits[1], last_logits(hf, CLEAN[1]))
    close(got.corrupt_logits[0], last_logits(hf, CORRUPT[0]))
    heads = patch_cells(hf, CLEAN, CORRUPT, [(1, 3, -1)], site="head_out", by=("layer", "head", "pos"),
                        answer=ANSWER, wrong=WRONG)
    want, _, _ = naive(hf, "head_out", ("layer", "head", "pos"), "denoise",
                       cells=[[{"layer": 1, "head": 3, "pos": 6}]])
    close(heads.score, want)


def test_task_pairs_and_strings(tok):
    class Pairs:  # anything with these four lists is a task
        clean = ["t1 t2 t3 t4 t5", "t6 t2 t3 t7 t5"]
        corrupt = ["t1 t2 t9 t4 t5", "t6 t2 t9 t7 t5"]
        answer = [" t11", "t12"]
        wrong = ["t12", "t11"]

    hf = gpt2()
    model = nnpatch.LanguageModel(hf, tokenizer=tok)
    got = nnpatch.activation_patching(model, Pairs(), site="resid_pre", progress=False)
    ids = lambda s: [int(w[1:]) + 2 for w in s.split()]  # noqa: E731 - the word tokenizer's ids
    want, _, _ = naive(hf, "resid_pre", ("layer", "pos"), "denoise", clean=[ids(s) for s in Pairs.clean],
                       corrupt=[ids(s) for s in Pairs.corrupt], answer=[13, 14], wrong=[14, 13])
    close(got.values, want)
    assert got.labels["pos"] == ["t1", "t2", "t3/t9", "t4", "t5"]
    assert got.labels["layer"][2] == "transformer.h.2.input"


def test_clear_errors(tok):
    model = nnpatch.LanguageModel(gpt2(), tokenizer=tok)
    with pytest.raises(nnpatch.NNPatchError, match="clean prompt 0 is 3 tokens long but corrupt prompt 0 is 4"):
        nnpatch.activation_patching(model, "t1 t2 t3", "t1 t2 t3 t4", answer="t5", wrong="t6")
    with pytest.raises(nnpatch.NNPatchError, match="'t5 t6' .* is 2 tokens"):
        nnpatch.activation_patching(model, "t1 t2 t3", "t1 t4 t3", answer="t5 t6", wrong="t6")
    with pytest.raises(nnpatch.NNPatchError, match="Available sites: resid_pre, resid_mid"):
        nnpatch.activation_patching(model, "t1 t2 t3", "t1 t4 t3", answer="t5", wrong="t6", site="resid_middle")
    with pytest.raises(nnpatch.NNPatchError, match="site='head_out'"):
        nnpatch.activation_patching(model, "t1 t2 t3", "t1 t4 t3", answer="t5", wrong="t6", by=("layer", "head"))
    with pytest.raises(nnpatch.NNPatchError, match="needs wrong="):
        nnpatch.activation_patching(model, "t1 t2 t3", "t1 t4 t3", answer="t5")
    with pytest.raises(nnpatch.NNPatchError, match="corrupt prompts"):
        nnpatch.activation_patching(model, "t1 t2 t3", answer="t5", wrong="t6")
    with pytest.raises(nnpatch.NNPatchError, match="by=\\('pos',\\) is not a sweep shape"):
        nnpatch.activation_patching(model, "t1 t2 t3", "t1 t4 t3", answer="t5", wrong="t6", by="pos")
    with pytest.raises(nnpatch.NNPatchError, match="same logit difference"):
        nnpatch.activation_patching(model, "t1 t2 t3", "t1 t2 t3", answer="t5", wrong="t6")


def test_interrupt_leaves_the_model_clean():
    hf = gpt2()
    blocks_before = list(hf.transformer.h)
    calls = {"n": 0}

    def interrupt(m, args):
        calls["n"] += 1
        if calls["n"] == 6:  # well inside the patched runs
            raise KeyboardInterrupt

    handle = hf.transformer.h[2].mlp.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        nnpatch.activation_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, batch_size=2, progress=False)
    handle.remove()
    assert all_hooks(hf) == 0
    assert list(hf.transformer.h) == blocks_before  # every skipped block is back
    want, _, _ = naive(hf, "resid_pre", ("layer",), "denoise")
    got = nnpatch.activation_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, by=("layer",), progress=False)
    close(got.values, want)


def test_progress_counts_the_patched_runs_done(monkeypatch):
    """The total is known before the first run and is the number of rows the model runs: runs
    that would reproduce the unpatched run (before the first differing token) are not counted."""
    from nnpatch.patching.runner import Runner
    hf = gpt2()
    calls, done = [], []
    run = Runner.run
    monkeypatch.setattr(Runner, "run", lambda self, rows, mode: done.append(len(rows)) or run(self, rows, mode))
    nnpatch.activation_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, by=("layer", "pos"),
                                batch_size=5, progress=lambda done, total: calls.append((done, total)))
    total = calls[0][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total) and len(calls) > 3
    assert total == sum(done) < 3 * 7 * len(CLEAN)  # fewer than a run per layer, position and pair
    assert all(a[0] <= b[0] and a[1] == total for a, b in zip(calls, calls[1:]))
    calls.clear()
    nnpatch.attribution_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG,
                                 progress=lambda done, total: calls.append((done, total)))
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] > 0


def test_layers_subset():
    hf = llama()
    want, _, _ = naive(hf, "mlp_out", ("layer", "pos"), "denoise")
    got = nnpatch.activation_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, site="mlp_out",
                                      layers=[2, 0], progress=False)
    close(got.values, want.reshape(3, -1)[[2, 0]])
    assert got.layers == [2, 0] and got.labels["layer"][0] == "model.layers.2.mlp.output"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_patching_the_whole_residual_stream_restores_the_clean_run(arch):
    # Replacing every position of a residual-stream site makes everything downstream clean, so
    # the normalised logit difference is exactly 1 (and 0 when noising). For resid_mid this only
    # holds if the patch reaches both the MLP branch and the residual branch.
    hf = BUILD[arch]()
    for site in ("resid_pre", "resid_mid", "resid_post"):
        for direction, want in (("denoise", 1.0), ("noise", 0.0)):
            got = nnpatch.activation_patching(hf, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, site=site,
                                              by=("layer",), direction=direction, progress=False)
            close(got.values, torch.full((3,), want))
