"""Programs a distributed test launches under torchrun (2 CPU processes, gloo): each rank runs
the sweeps below and saves what it got to OUT/rank{r}.pt for tests/test_sweep_distributed.py."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import gpt2, prompt, word_tokenizer  # noqa: E402

import nnpatch  # noqa: E402
from nnpatch.patching import checkpoint  # noqa: E402

CLEAN = [prompt(1, 2, 3, 4, 5, 6), prompt(3, 1, 4, 1, 5, 9), prompt(2, 7, 1, 8, 2, 8),
         prompt(1, 2, 3, 4, 5, 6), prompt(6, 6, 6, 6, 6, 6)]
CORRUPT = [prompt(1, 2, 9, 4, 5, 6), prompt(3, 1, 4, 1, 7, 9), prompt(2, 7, 1, 3, 2, 8),
           prompt(1, 2, 9, 4, 5, 6), prompt(6, 6, 6, 6, 6, 6)]
OPTIONS = dict(answer="t5", wrong="t6", metric="logit_diff_raw", site="resid_pre", by=("layer", "pos"))


def model(seed=0):
    return nnpatch.LanguageModel(gpt2(seed=seed), tokenizer=word_tokenizer())


def attempt(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  the test checks each rank's error
        return f"{type(e).__name__}: {e}"


def main(out):
    rank = int(os.environ["RANK"])
    got = {}
    reports = []
    got["pairs"] = nnpatch.activation_patching(model(), CLEAN, CORRUPT, distributed=True, batch_size=2,
                                               progress=lambda d, t: reports.append((d, t)), **OPTIONS).values
    got["reports"] = reports
    got["cells"] = nnpatch.activation_patching(model(), CLEAN[0], CORRUPT[0], progress=False, **OPTIONS).values
    got["heads"] = nnpatch.activation_patching(model(), CLEAN[:3], CORRUPT[:3], progress=False,
                                               **{**OPTIONS, "site": "head_out", "by": ("layer", "head"),
                                                  "metric": "kl"}).values
    path = os.path.join(out, "run.safetensors")
    got["checkpoint"] = nnpatch.activation_patching(model(), CLEAN, CORRUPT, checkpoint=path, progress=False,
                                                    **OPTIONS).values
    if rank == 1:  # one rank's checkpoint is damaged: both ranks stop, neither waits
        with open(os.path.join(out, "run.rank1-of-2.safetensors"), "wb") as f:
            f.write(b"damaged")
    got["bad_checkpoint"] = attempt(lambda: nnpatch.activation_patching(model(), CLEAN, CORRUPT, checkpoint=path,
                                                                        progress=False, **OPTIONS))
    got["too_many_ranks"] = attempt(lambda: nnpatch.activation_patching(
        model(), CLEAN[0], CORRUPT[0], layers=[0], progress=False, **{**OPTIONS, "by": ("layer",)}))

    lm = model()
    if rank == 1:  # one rank's model fails mid-sweep
        def boom(module, args, output):
            if output[0].shape[0] < 3:  # a patched batch, after the reference runs
                raise RuntimeError("boom on rank 1")
        lm.module.transformer.h[2].register_forward_hook(boom)
    got["one_rank_fails"] = attempt(lambda: nnpatch.activation_patching(lm, CLEAN, CORRUPT, batch_size=2,
                                                                        progress=False, **OPTIONS))
    got["other_weights"] = attempt(lambda: nnpatch.activation_patching(model(seed=rank), CLEAN, CORRUPT,
                                                                       progress=False, **OPTIONS))
    version = checkpoint.version
    if rank == 1:
        checkpoint.version = lambda: "0.0.0-other"
    got["other_version"] = attempt(lambda: nnpatch.activation_patching(model(), CLEAN, CORRUPT, progress=False,
                                                                       **OPTIONS))
    checkpoint.version = version
    got["custom_metric"] = attempt(lambda: nnpatch.activation_patching(
        model(), CLEAN, CORRUPT, progress=False, **{**OPTIONS, "metric": lambda logits: logits[:, 5].mean()}))
    got["after_errors"] = nnpatch.activation_patching(model(), CLEAN, CORRUPT, progress=False, **OPTIONS).values
    torch.save(got, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
