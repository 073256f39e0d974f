"""Memory-bounded sweeps: pairs stream through in parts that fit a budget, batches fit the rest,
and the grid equals the unstreamed sweep and the plain-hook reference (issue 15, item 2)."""
import pytest
import torch

import nnpatch
from conftest import all_hooks, gpt2, llama, patching_reference, prompt, site_places, sweep_cells, word_tokenizer
from nnpatch.patching import memory
from nnpatch.patching.job import Job
from nnpatch.patching.runner import Runner

RESID = {"gpt2": {"resid_pre": "transformer.h.{i}.input"}, "llama": {"resid_pre": "model.layers.{i}.input"}}
BUILD = {"gpt2": gpt2, "llama": llama}


def sharp(hf):
    """Wider embeddings, so that clean and corrupt logit differences are far apart and the
    normalised grid is well conditioned."""
    torch.manual_seed(1)
    with torch.no_grad():
        hf.get_input_embeddings().weight.normal_(std=1.0)
    return hf


def pairs_of(n, length, seed=0):
    """n random pairs of `length` tokens whose middle token differs; one pair whose prompts are
    equal, two pairs that are the same."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, 50, (n, length), generator=g)
    corrupt = clean.clone()
    corrupt[:, length // 2] = torch.randint(2, 50, (n,), generator=g)
    corrupt[n // 2] = clean[n // 2]  # one pair whose patches change nothing
    if n > 3:
        clean[3], corrupt[3] = clean[1], corrupt[1]  # two equal pairs
    text = lambda row: prompt(*(int(t) - 2 for t in row))  # noqa: E731
    return [text(r) for r in clean], [text(r) for r in corrupt]


def parts_seen(monkeypatch):
    """The number of pairs of each part a sweep runs reference runs for."""
    seen = []
    original = Runner.reference_runs

    def spy(self):
        seen.append(self.group.n)
        return original(self)
    monkeypatch.setattr(Runner, "reference_runs", spy)
    return seen


def budget_for(model, clean, corrupt, pairs_per_part, **kw):
    job = Job(model, clean, corrupt, "t5", "t6", kw.get("metric", "logit_diff"), "resid_pre",
              kw.get("by", ("layer", "pos")), "denoise", None)
    unit = memory.Budget(job, 1).pair_bytes(job.seq_len)
    return 2 * unit * pairs_per_part + 1


# logit_diff_raw, not logit_diff: random answers leave clean and corrupt close, which makes the
# normalised grid ill-conditioned.
@pytest.mark.parametrize("arch,metric", [("gpt2", "logit_diff_raw"), ("llama", "kl"), ("llama", "prob")])
def test_streamed_parts_equal_one_part_and_the_hook_reference(arch, metric, monkeypatch):
    hf = sharp(BUILD[arch]())
    model = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    clean, corrupt = pairs_of(7, 5)
    options = dict(answer="t5", wrong="t6", metric=metric, site="resid_pre", by=("layer", "pos"))
    whole = nnpatch.activation_patching(model, clean, corrupt, memory_budget=1 << 30, progress=False, **options)
    seen = parts_seen(monkeypatch)
    reports = []
    budget = budget_for(model, clean, corrupt, 2, metric=metric)
    streamed = nnpatch.activation_patching(model, clean, corrupt, memory_budget=budget,
                                           progress=lambda d, t: reports.append((d, t)), **options)
    assert seen == [2, 2, 2, 1]
    assert torch.allclose(streamed.values, whole.values, atol=1e-6)
    assert (streamed.clean_score, streamed.corrupt_score) == pytest.approx((whole.clean_score, whole.corrupt_score), abs=1e-6)
    done, total = reports[-1]
    assert done == total and all(t >= total for _, t in reports)  # the bar ends at the runs made
    tok = lambda ps: [[int(w[1:]) + 2 for w in p.split()] for p in ps]  # noqa: E731
    ref = patching_reference(hf, site_places(hf, RESID[arch]), tok(clean), tok(corrupt),
                             sweep_cells(("layer", "pos"), {"layer": 3, "pos": 5}), site="resid_pre",
                             answer=7, wrong=8, metric=metric)
    assert torch.allclose(streamed.values.double().flatten(), ref.values, atol=1e-5)


def test_512_pairs_stream_in_parts_with_pairs_of_two_lengths(monkeypatch):
    hf = sharp(gpt2(n_layer=2, d=16))
    model = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    c1, k1 = pairs_of(256, 4, seed=1)
    c2, k2 = pairs_of(256, 6, seed=2)
    clean, corrupt = c1 + c2, k1 + k2
    options = dict(answer="t5", wrong="t6", metric="logit_diff_raw", site="resid_pre", by=("layer",), progress=False)
    whole = nnpatch.activation_patching(model, clean, corrupt, memory_budget=1 << 32, **options)
    seen = parts_seen(monkeypatch)
    budget = budget_for(model, c2, k2, 64, by=("layer",))
    streamed = nnpatch.activation_patching(model, clean, corrupt, memory_budget=budget, **options)
    assert sum(seen) == 512 and max(seen) <= 128 and len(seen) >= 6  # 4-token pairs: more per part
    assert torch.allclose(streamed.values, whole.values, atol=1e-6)
    tok = lambda ps: [[int(w[1:]) + 2 for w in p.split()] for p in ps]  # noqa: E731
    ref = patching_reference(hf, site_places(hf, RESID["gpt2"]), tok(clean[::16]), tok(corrupt[::16]),
                             sweep_cells(("layer",), {"layer": 2}), site="resid_pre", answer=7, wrong=8,
                             metric="logit_diff_raw")
    sub = nnpatch.activation_patching(model, clean[::16], corrupt[::16], memory_budget=budget, **options)
    assert torch.allclose(sub.values.double(), ref.values, atol=1e-5)


def test_default_budget_is_half_the_free_memory_capped_on_the_cpu(monkeypatch):
    model = nnpatch.LanguageModel(gpt2(), tokenizer=word_tokenizer())
    job = Job(model, prompt(1, 2, 3), prompt(1, 4, 3), "t5", "t6", "logit_diff", "resid_pre", ("layer",),
              "denoise", None)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10_000_000)
    assert memory.Budget(job).bytes == 5_000_000
    monkeypatch.setattr(memory, "free_bytes", lambda device: 100 << 30)
    assert memory.Budget(job).bytes == memory.CPU_DEFAULT  # bigger CPU batches run slower
    monkeypatch.undo()
    assert 0 < memory.free_bytes(torch.device("cpu"))


@pytest.mark.parametrize("budget,match", [(1000, r"memory_budget=1,000 bytes is too small for one prompt "
                                                   r"pair's reference runs of 3 tokens on GPT2LMHeadModel .* give memory_budget >= "),
                                          (-5, "positive number of bytes"), (2.5, "positive number of bytes")])
def test_a_budget_too_small_for_one_run_is_a_clear_error(budget, match):
    hf = gpt2()
    model = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    with pytest.raises(nnpatch.NNPatchError, match=match):
        nnpatch.activation_patching(model, prompt(1, 2, 3), prompt(1, 4, 3), answer="t5", wrong="t6",
                                    memory_budget=budget, progress=False)
    assert all_hooks(hf) == 0
