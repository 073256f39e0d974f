"""Sweeps on every supported architecture against a one-forward-per-cell loop.

The fast path (blocks swapped for pass-throughs, runs started mid-prompt from the key/value
cache, last block trimmed) depends on each architecture's forward; this checks it for all of them.
"""
import pytest

import nnpatch
from conftest import patching_reference, site_places, sweep_cells
from test_sites import SEQUENTIAL, PARALLEL, build

pytestmark = pytest.mark.usefixtures("one_thread")

CLEAN = [[3, 4, 5, 6, 7, 8], [9, 4, 10, 11, 7, 12]]
CORRUPT = [[3, 4, 13, 6, 7, 8], [9, 4, 14, 11, 15, 12]]
ANSWER, WRONG = [20, 21], [22, 23]


# Where resid_pre, mlp_out and head_out are in each architecture, written out by hand (not read
# from nnpatch's site table, which is what is under test).
GPT2 = {"resid_pre": "transformer.h.{i}.input", "mlp_out": "transformer.h.{i}.mlp.output",
        "head_out": "transformer.h.{i}.attn.c_proj.input"}
LLAMA = {"resid_pre": "model.layers.{i}.input", "mlp_out": "model.layers.{i}.mlp.output",
         "head_out": "model.layers.{i}.self_attn.o_proj.input"}
GEMMA2 = {**LLAMA, "mlp_out": "model.layers.{i}.post_feedforward_layernorm.output"}  # normed before the residual
NEOX = {"resid_pre": "gpt_neox.layers.{i}.input", "mlp_out": "gpt_neox.layers.{i}.mlp.output",
        "head_out": "gpt_neox.layers.{i}.attention.dense.input"}
GPTJ = {"resid_pre": "transformer.h.{i}.input", "mlp_out": "transformer.h.{i}.mlp.output",
        "head_out": "transformer.h.{i}.attn.out_proj.input"}
BERT = {"resid_pre": "bert.encoder.layer.{i}.input", "mlp_out": "bert.encoder.layer.{i}.output.dense.output",
        "head_out": "bert.encoder.layer.{i}.attention.output.dense.input"}
PATHS = {"gpt2": GPT2, "gpt_neox": NEOX, "gpt_neox_sequential": NEOX, "gptj": GPTJ, "llama": LLAMA,
         "mistral": LLAMA, "qwen2": LLAMA, "gemma": LLAMA, "gemma2": GEMMA2, "gemma3": GEMMA2, "bert": BERT}


def naive(model, name, site, by, direction):
    """Raw logit differences of each cell: the shared plain-hook reference, one forward per cell and pair."""
    shape = {"layer": 3, "head": 4, "pos": len(CLEAN[0])}
    ref = patching_reference(model, site_places(model, PATHS[name], n_layers=3), CLEAN, CORRUPT,
                             sweep_cells(by, shape), site=site, answer=ANSWER, wrong=WRONG,
                             metric="logit_diff_raw", direction=direction, n_heads=4)
    return ref.values.reshape([shape[d] for d in by])


@pytest.mark.parametrize("name", SEQUENTIAL + PARALLEL + ["bert"])
def test_every_architecture_matches_the_loop(name):
    model = build(name)
    for site, by, direction in [("resid_pre", ("layer", "pos"), "denoise"), ("mlp_out", ("layer", "pos"), "noise"),
                                ("head_out", ("layer", "head"), "denoise")]:
        got = nnpatch.activation_patching(model, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, site=site, by=by,
                                          direction=direction, metric="logit_diff_raw", batch_size=7,
                                          progress=False)
        want = naive(model, name, site, by, direction)
        err = (got.values - want).abs().max().item()
        assert err < 1e-4 * max(1.0, want.abs().max().item()), f"{site} {by} {direction}: max error {err}"
