"""Activation patching of resid_pre by layer x position: nnpatch against a loop, TransformerLens
and nnsight, in one process on one model.

The model has GPT-2 small's shape (12 layers, d_model 768, 12 heads, vocab 50257) with random
weights, saved to a temporary folder so that every library loads the same weights. 8 prompt pairs
of 15 tokens; the metric is the mean logit difference of the answer over the wrong token at the
last position. Every method's grid is checked against the naive loop's.

    python benchmarks/sweep.py                 # all methods that are installed
    python benchmarks/sweep.py --skip tl,nnsight --threads 1

Times are wall-clock seconds on whatever else the machine is doing; compare the ratios, which
come from one run.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

N_LAYERS, D_MODEL, N_HEADS, VOCAB = 12, 768, 12, 50257


def build(folder: str) -> None:
    """Save a random GPT-2-small-shaped model and a word-level tokenizer to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, vocab_size=VOCAB,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    words = [f"w{i}" for i in range(VOCAB)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0",
                                        bos_token="w0", eos_token="w0")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load(folder: str):
    """A fresh copy of the saved model: TransformerLens's bridge rewires the module it is given."""
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(folder).eval()


def data(n_pairs: int, n_tokens: int):
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(1, VOCAB, (n_pairs, n_tokens), generator=g)
    corrupt = clean.clone()
    corrupt[:, [3, 9]] = torch.randint(1, VOCAB, (n_pairs, 2), generator=g)
    answer = torch.randint(1, VOCAB, (n_pairs,), generator=g)
    wrong = torch.randint(1, VOCAB, (n_pairs,), generator=g)
    return clean, corrupt, answer, wrong


def metric_of(answer, wrong):
    rows = torch.arange(len(answer))

    def metric(logits):  # [batch, pos, vocab] -> mean logit difference at the last position
        last = logits[:, -1]
        return (last[rows, answer] - last[rows, wrong]).mean()
    return metric


@dataclass
class Timing:
    wall: float  # seconds on the clock
    cpu: float  # seconds of this process's CPU time: with one thread, what other jobs on a shared machine distort least

    def __truediv__(self, other: "Timing") -> "Timing":
        return Timing(self.wall / other.wall, self.cpu / other.cpu)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), out


# -- the methods ------------------------------------------------------------------------------------
def forward_time(model, ids, repeats=3) -> Timing:
    with torch.no_grad():
        model(ids)
        total, _ = timed(lambda: [model(ids) for _ in range(repeats)])
    return Timing(total.wall / repeats, total.cpu / repeats)


def naive_loop(model, clean, corrupt, metric):
    """One forward per cell, all pairs in its batch, patched by a plain forward pre-hook."""
    blocks = model.transformer.h
    saved = {}
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: saved.__setitem__(i, a[0].clone()))
               for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(clean)
    for h in handles:
        h.remove()
    out = torch.zeros(len(blocks), clean.shape[1])
    for layer, block in enumerate(blocks):
        for pos in range(clean.shape[1]):
            def patch(m, args, layer=layer, pos=pos):
                x = args[0].clone()
                x[:, pos] = saved[layer][:, pos]
                return (x,) + args[1:]
            handle = block.register_forward_pre_hook(patch)
            try:
                with torch.no_grad():
                    out[layer, pos] = metric(model(corrupt).logits)
            finally:
                handle.remove()
    return out


def transformer_lens(folder, model, clean, corrupt, metric):
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer
    bridge = TransformerBridge.boot_transformers(folder, hf_model=model, device="cpu",
                                                 tokenizer=AutoTokenizer.from_pretrained(folder))

    def run():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(clean)
            return patching.get_act_patch_resid_pre(bridge, corrupt, cache, metric)
    return timed(run)


def nnsight_loop(folder, model, clean, corrupt, metric):
    from nnsight import LanguageModel
    from transformers import AutoTokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = LanguageModel(model, tokenizer=AutoTokenizer.from_pretrained(folder))

    def run():
        saved = []
        with torch.no_grad():
            with lm.trace(clean):
                for layer in range(N_LAYERS):
                    saved.append(lm.transformer.h[layer].input.save())
            out = torch.zeros(N_LAYERS, clean.shape[1])
            for layer in range(N_LAYERS):
                for pos in range(clean.shape[1]):
                    with lm.trace(corrupt):
                        lm.transformer.h[layer].input[:, pos] = saved[layer][:, pos]
                        logits = lm.lm_head.output.save()
                    out[layer, pos] = metric(logits)
        return out
    return timed(run)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip", default="", help="comma-separated: naive,tl,nnsight")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)

    import nnpatch
    folder = tempfile.mkdtemp(prefix="nnpatch-bench-")
    build(folder)
    model = load(folder)
    clean, corrupt, answer, wrong = data(args.pairs, args.tokens)
    metric = metric_of(answer, wrong)
    print(f"GPT-2-small shape, random weights; {args.pairs} pairs x {args.tokens} tokens; resid_pre by "
          f"layer x pos ({N_LAYERS * args.tokens} cells); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    times, grids = {}, {}
    one_forward = forward_time(model, corrupt)
    print(f"  one forward pass ({args.pairs} x {args.tokens} tokens): {one_forward.wall:.3f} s "
          f"(cpu {one_forward.cpu:.3f} s)")
    if "naive" not in skip:
        times["naive loop"], grids["naive loop"] = timed(lambda: naive_loop(model, clean, corrupt, metric))
        print(f"  naive loop: {times['naive loop'].wall:.1f} s")
    if "tl" not in skip:
        try:
            times["TransformerLens"], grids["TransformerLens"] = transformer_lens(folder, load(folder), clean,
                                                                                  corrupt, metric)
            print(f"  TransformerLens: {times['TransformerLens'].wall:.1f} s")
        except ImportError:
            print("  TransformerLens: not installed (pip install transformer_lens)")
    if "nnsight" not in skip:
        try:
            times["nnsight loop"], grids["nnsight loop"] = nnsight_loop(folder, load(folder), clean, corrupt, metric)
            print(f"  nnsight loop: {times['nnsight loop'].wall:.1f} s")
        except ImportError:
            print("  nnsight: not installed (pip install nnsight)")

    kwargs = dict(answer=answer.tolist(), wrong=wrong.tolist(), metric="logit_diff_raw", site="resid_pre",
                  by=("layer", "pos"), progress=False)
    times["nnpatch"], result = timed(lambda: nnpatch.activation_patching(model, clean, corrupt, **kwargs))
    grids["nnpatch"] = result.values
    print(f"  nnpatch activation patching: {times['nnpatch'].wall:.1f} s")
    attribution, _ = timed(lambda: nnpatch.attribution_patching(model, clean, corrupt, **kwargs))
    print(f"  nnpatch attribution patching: {attribution.wall:.2f} s")

    reference = grids.get("naive loop", grids["nnpatch"])
    print("\nmethod                 wall s    cpu s   nnpatch faster by (wall / cpu)   max |diff| vs naive")
    for name, t in times.items():
        ratio = t / times["nnpatch"]
        diff = (grids[name].float() - reference.float()).abs().max().item()
        print(f"  {name:<20} {t.wall:7.1f}  {t.cpu:7.1f}   {ratio.wall:8.1f}x / {ratio.cpu:4.1f}x"
              f"{'':16}{diff:.1e}")
    per_forward = attribution / one_forward
    print(f"  attribution patching of the whole grid = {per_forward.wall:.2f} forward-pass times on the clock, "
          f"{per_forward.cpu:.2f} in cpu time")


if __name__ == "__main__":
    main()
