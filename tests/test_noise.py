"""noise_patching (causal tracing) against a hand-written loop: one plain forward per cell and prompt,
the same Gaussian noise added to the subject tokens' input embeddings by a plain hook."""
import pytest
import torch

import nnpatch
from conftest import last_logits, llama, prompt, word_tokenizer
from nnpatch.patching.noise import NoisePatchingResult

CLEAN = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def ioi():
    return nnpatch.models.load("ioi")


def draws(hf, subjects, scale, seed):
    """The documented draw: prompt i's noise is the i-th randn([subject tokens, d]) of a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    d = hf.get_input_embeddings().weight.shape[-1]
    return [torch.randn(len(s), d, generator=gen) * scale for s in subjects]


def reference(lm, prompts, subjects, scale, seed, place, cells, mode, answer, wrong):
    """Causal tracing written out. `place(layer)` -> (module, kind); a cell is {"layer", "pos"?, "head"?}."""
    hf = lm.module
    embed = hf.get_input_embeddings()
    n_heads = hf.config.num_attention_heads
    noises = draws(hf, subjects, scale, seed)
    ids = [lm.to_tokens(p) for p in prompts]
    a, w = lm.to_tokens(answer)[0], lm.to_tokens(wrong)[0]

    def noisy(i):
        def fn(v):
            v = v.clone()
            v[0, subjects[i]] += noises[i]
            return v
        return (embed, "output", fn)

    def recorded(i, with_noise):
        seen = {}
        layers = sorted({c["layer"] for c in cells})
        hooks = [(*place(layer), lambda v, layer=layer: seen.__setitem__(layer, v.clone())) for layer in layers]
        logits = last_logits(hf, ids[i], hooks + ([noisy(i)] if with_noise else []))
        return seen, float(logits[a] - logits[w])

    clean = [recorded(i, False) for i in range(len(prompts))]
    noisy_runs = [recorded(i, True) for i in range(len(prompts))]
    clean_score = sum(s for _, s in clean) / len(prompts)
    noisy_score = sum(s for _, s in noisy_runs) / len(prompts)
    values = []
    for cell in cells:
        scores = []
        for i in range(len(prompts)):
            source = (clean if mode == "denoise" else noisy_runs)[i][0][cell["layer"]]

            def write(v, source=source):
                v = v.clone()
                pos = cell.get("pos", slice(None))
                if "head" in cell:
                    heads = v.view(*v.shape[:-1], n_heads, -1)
                    heads[:, pos, cell["head"]] = source.view(*source.shape[:-1], n_heads, -1)[:, pos, cell["head"]]
                else:
                    v[:, pos] = source[:, pos]
                return v
            hooks = [(*place(cell["layer"]), write)] + ([noisy(i)] if mode == "denoise" else [])
            logits = last_logits(hf, ids[i], hooks)
            scores.append(float(logits[a] - logits[w]))
        values.append((sum(scores) / len(scores) - noisy_score) / (clean_score - noisy_score))
    return torch.tensor(values), clean_score, noisy_score


def grid(shape, by):
    return [dict(zip(by, map(int, idx))) for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(by))]


@pytest.mark.parametrize("mode", ["denoise", "noise"])
def test_resid_by_layer_pos_equals_the_hand_loop(ioi, mode):
    pair = nnpatch.tasks.ioi(1, template=0)[0]
    got = nnpatch.noise_patching(ioi, pair.clean, subject=[9, 10], answer=pair.answer, wrong=pair.wrong,
                                 mode=mode, progress=False)
    assert got.subject == [[9, 10]] and got.direction == mode and got.values.shape == (4, 14)
    scale = 3 * float(ioi.module.transformer.wte.weight.detach().std())
    assert abs(got.noise - scale) < 1e-6
    blocks = ioi.module.transformer.h
    values, clean_score, noisy_score = reference(ioi, [pair.clean], [[9, 10]], scale, 0,
                                                 lambda layer: (blocks[layer], "input"),
                                                 grid((4, 14), ("layer", "pos")), mode, pair.answer, pair.wrong)
    assert torch.allclose(got.values.flatten(), values.float(), atol=2e-4)
    assert abs(got.clean_score - clean_score) < 1e-4 and abs(got.corrupt_score - noisy_score) < 1e-4
    assert float(values.abs().max()) > 0.2 and abs(clean_score - noisy_score) > 1  # the noise does something


def test_two_prompts_use_consecutive_draws(ioi):
    prompts = [CLEAN, "When Mary and John went to the store, Mary gave a drink to"]
    got = nnpatch.noise_patching(ioi, prompts, subject=[3], answer=" Mary", wrong=" John", site="mlp_out",
                                 by="layer", seed=7, noise=0.5, progress=False)
    mlps = ioi.module.transformer.h
    values, clean_score, noisy_score = reference(ioi, prompts, [[3], [3]], 0.5, 7, lambda layer: (mlps[layer].mlp, "output"),
                                                 grid((4,), ("layer",)), "denoise", " Mary", " John")
    assert torch.allclose(got.values, values.float(), atol=2e-4)
    assert abs(got.corrupt_score - noisy_score) < 1e-4 and got.noise == 0.5 and got.seed == 7


@pytest.mark.parametrize("mode", ["denoise", "noise"])
def test_llama_heads_and_positions_equal_the_hand_loop(mode):
    lm = nnpatch.LanguageModel(llama(), tokenizer=word_tokenizer())
    text = prompt(5, 9, 2, 14, 3, 8)
    layers = lm.module.model.layers
    by_pos = nnpatch.noise_patching(lm, text, subject="t9 t2", answer="t4", wrong="t9", mode=mode, noise=2.0,
                                    progress=False)
    assert by_pos.subject == [[1, 2]]
    values, *_ = reference(lm, [text], [[1, 2]], 2.0, 0, lambda layer: (layers[layer], "input"),
                           grid((3, 6), ("layer", "pos")), mode, "t4", "t9")
    assert torch.allclose(by_pos.values.flatten(), values.float(), atol=2e-4)
    heads = nnpatch.noise_patching(lm, text, subject=[1, 2], answer="t4", wrong="t9", mode=mode, noise=2.0,
                                   site="head_out", by=("layer", "head"), progress=False)
    values, *_ = reference(lm, [text], [[1, 2]], 2.0, 0, lambda layer: (layers[layer].self_attn.o_proj, "input"),
                           grid((3, 4), ("layer", "head")), mode, "t4", "t9")
    assert torch.allclose(heads.values.flatten(), values.float(), atol=2e-4)


def test_noise_changes_nothing_before_the_subject(ioi):
    r = nnpatch.noise_patching(ioi, CLEAN, subject=" John gave", answer=" Mary", wrong=" John", progress=False)
    assert r.subject == [[9, 10]]
    assert torch.all(r.values[:, :9] == 0)  # clean and noisy runs agree there: patching restores nothing


def test_the_default_scale_is_stated(ioi):
    r = nnpatch.noise_patching(ioi, CLEAN, subject=[1], answer=" Mary", wrong=" John", by="layer", progress=False)
    assert r.noise == pytest.approx(3 * float(ioi.module.transformer.wte.weight.detach().std()))
    assert "noise std" in repr(r) and "noise std" in r.plot().layout.title.text


@pytest.mark.parametrize("subject, error, match", [
    (" Bob", ValueError, "subject ' Bob' does not occur in prompt 0"),
    ([14], IndexError, r"position 14 is out of range for prompt 0, which has 14 tokens"),
    ([], TypeError, "non-empty list of token positions"),
    (2.5, TypeError, "piece of the prompt"),
    ([[1], [2]], ValueError, "2 subjects for 1 prompts"),
])
def test_bad_subject_says_what_is_wrong(ioi, subject, error, match):
    with pytest.raises(error, match=match):
        nnpatch.noise_patching(ioi, CLEAN, subject=subject, answer=" Mary", wrong=" John", progress=False)


def test_bad_noise_scale(ioi):
    with pytest.raises(ValueError, match="positive standard deviation"):
        nnpatch.noise_patching(ioi, CLEAN, subject=[1], noise=0.0, answer=" Mary", wrong=" John", progress=False)


def test_save_and_load_keep_the_noise_the_subject_and_the_seed(ioi, tmp_path):
    r = nnpatch.noise_patching(ioi, CLEAN, subject=" John gave", noise=0.7, seed=5, answer=" Mary",
                               wrong=" John", by="layer", progress=False)
    path = tmp_path / "trace.safetensors"
    r.save(path)
    back = NoisePatchingResult.load(path)
    assert isinstance(back, NoisePatchingResult)
    assert (back.noise, back.subject, back.seed) == (0.7, [[9, 10]], 5)
    assert torch.equal(back.values, r.values) and repr(back) == repr(r)
    plain = nnpatch.PatchingResult.load(path)  # the grid and the usual fields
    assert torch.equal(plain.values, r.values) and plain.clean_score == r.clean_score


def test_a_noise_file_with_a_bad_subject_is_refused(ioi, tmp_path):
    import json
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    r = nnpatch.noise_patching(ioi, CLEAN, subject=[1], answer=" Mary", wrong=" John", by="layer", progress=False)
    path = tmp_path / "trace.safetensors"
    r.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["nnpatch"])
    meta["subject"] = [["one"]]
    save_file(load_file(str(path)), str(path), metadata={"nnpatch": json.dumps(meta)})
    with pytest.raises(nnpatch.errors.NNPatchValueError, match="subject must be one list of token positions"):
        NoisePatchingResult.load(path)
