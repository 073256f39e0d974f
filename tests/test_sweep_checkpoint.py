"""Resumable sweeps: a sweep killed with SIGKILL resumes from its checkpoint to the grid of an
uninterrupted run; a checkpoint of another sweep is refused (issue 15, item 4)."""
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import nnpatch
from conftest import all_hooks, gpt2, prompt, word_tokenizer
from nnpatch.patching.runner import Runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLEAN = [prompt(1, 2, 3, 4, 5, 6, 7, 8), prompt(3, 1, 4, 1, 5, 9, 2, 6), prompt(1, 2, 3, 4, 5, 6, 7, 8)]
CORRUPT = [prompt(1, 2, 3, 9, 5, 6, 7, 8), prompt(3, 1, 4, 1, 7, 9, 2, 6), prompt(1, 2, 3, 9, 5, 6, 7, 8)]
OPTIONS = dict(answer="t5", wrong="t6", metric="logit_diff_raw", site="resid_pre", by=("layer", "pos"))

CHILD = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import nnpatch
from nnpatch.patching import checkpoint
from conftest import gpt2, word_tokenizer
checkpoint.SAVE_EVERY_S = 0  # write after every batch, so that a kill lands between writes
model = nnpatch.LanguageModel(gpt2(), tokenizer=word_tokenizer())
nnpatch.activation_patching(model, {clean!r}, {corrupt!r}, checkpoint={path!r}, batch_size=1,
                            progress=lambda done, total: time.sleep(0.05), **{options!r})
print("finished")
"""


def rows_in(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return int(f.get_tensor("have").sum()), f.get_tensor("have").numel()


def model():
    return nnpatch.LanguageModel(gpt2(), tokenizer=word_tokenizer())


def test_a_sweep_killed_mid_run_resumes_to_the_uninterrupted_grid(tmp_path):
    path = tmp_path / "run.safetensors"
    script = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), clean=CLEAN, corrupt=CORRUPT,
                          path=str(path), options=OPTIONS)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and rows_in(path)[0] > 30):
            assert child.poll() is None, child.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the child never wrote its checkpoint"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    done, total = rows_in(path)
    assert 30 < done < total  # killed mid-run, the last complete write intact

    full = nnpatch.activation_patching(model(), CLEAN, CORRUPT, progress=False, **OPTIONS)
    reports = []
    resumed = nnpatch.activation_patching(model(), CLEAN, CORRUPT, checkpoint=path,
                                          progress=lambda d, t: reports.append((d, t)), **OPTIONS)
    assert torch.allclose(resumed.values, full.values, atol=1e-6)
    assert (resumed.clean_score, resumed.corrupt_score) == pytest.approx((full.clean_score, full.corrupt_score))
    run_again = reports[-1]
    assert run_again[0] == run_again[1] and 0 < run_again[1] <= total - done  # only the rows left
    assert rows_in(path) == (total, total)

    calls = []
    original = Runner.run
    try:
        Runner.run = lambda self, rows, mode: calls.append(rows) or original(self, rows, mode)
        again = nnpatch.activation_patching(model(), CLEAN, CORRUPT, checkpoint=path, progress=False, **OPTIONS)
    finally:
        Runner.run = original
    assert calls == [] and torch.equal(again.values, resumed.values)  # a finished file: no runs


@pytest.mark.parametrize("change,field", [
    (dict(model=lambda: nnpatch.LanguageModel(gpt2(seed=1), tokenizer=word_tokenizer())), "weights"),
    (dict(model=lambda: nnpatch.LanguageModel(gpt2(n_layer=2), tokenizer=word_tokenizer())), "config"),
    (dict(clean=CLEAN[:2] + [CLEAN[1]], corrupt=CORRUPT[:2] + [CORRUPT[1]]), "pairs"),
    (dict(site="mlp_out"), "site"),
    (dict(by=("layer",)), "by"),
    (dict(metric="prob"), "metric"),
])
def test_a_checkpoint_of_another_sweep_is_refused_and_stays_loadable(tmp_path, change, field):
    path = tmp_path / "run.safetensors"
    first = nnpatch.activation_patching(model(), CLEAN, CORRUPT, checkpoint=path, progress=False, **OPTIONS)
    before = path.read_bytes()
    other = change.pop("model", model)()
    args = {**OPTIONS, **{k: v for k, v in change.items() if k not in ("clean", "corrupt")}}
    with pytest.raises(nnpatch.NNPatchError, match=rf"checkpoint .*run.safetensors was written by a different "
                                                   rf"sweep \({field}: file .* this sweep .*delete the file"):
        nnpatch.activation_patching(other, change.get("clean", CLEAN), change.get("corrupt", CORRUPT),
                                    checkpoint=path, progress=False, **args)
    assert path.read_bytes() == before and all_hooks(other.module) == 0
    again = nnpatch.activation_patching(model(), CLEAN, CORRUPT, checkpoint=path, progress=False, **OPTIONS)
    assert torch.equal(again.values, first.values)


def test_checkpoint_needs_a_named_metric_and_a_readable_file(tmp_path):
    with pytest.raises(nnpatch.NNPatchError, match="checkpoint= needs a named metric"):
        nnpatch.activation_patching(model(), CLEAN, CORRUPT, checkpoint=tmp_path / "c.safetensors",
                                    progress=False, **{**OPTIONS, "metric": lambda logits: logits[:, 5].mean()})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(nnpatch.NNPatchError, match="cannot be read .* delete it or give another path"):
        nnpatch.activation_patching(model(), CLEAN, CORRUPT, checkpoint=bad, progress=False, **OPTIONS)


def test_an_interrupted_streamed_sweep_resumes_part_by_part(tmp_path):
    from nnpatch.patching.job import Job
    from nnpatch.patching.memory import Budget
    path = tmp_path / "run.safetensors"
    job = Job(model(), CLEAN, CORRUPT, "t5", "t6", "logit_diff_raw", "resid_pre", ("layer", "pos"), "denoise", None)
    one_pair = 2 * Budget(job, 1).pair_bytes(job.seq_len) + 1  # parts of one pair each
    full = nnpatch.activation_patching(model(), CLEAN, CORRUPT, progress=False, **OPTIONS)

    def stop_after(n):
        def progress(done, total):
            if done >= n:
                raise KeyboardInterrupt
        return progress
    with pytest.raises(KeyboardInterrupt):
        nnpatch.activation_patching(model(), CLEAN, CORRUPT, checkpoint=path, memory_budget=one_pair,
                                    batch_size=4, progress=stop_after(12), **OPTIONS)
    done, total = rows_in(path)
    assert 0 < done < total  # the rows finished before the interrupt were written on the way out
    reports = []
    resumed = nnpatch.activation_patching(model(), CLEAN, CORRUPT, checkpoint=path, memory_budget=one_pair,
                                          batch_size=4, progress=lambda d, t: reports.append((d, t)), **OPTIONS)
    assert torch.allclose(resumed.values, full.values, atol=1e-6)
    assert reports[-1][0] == reports[-1][1] <= total - done
