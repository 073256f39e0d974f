"""What a trace costs over the forward pass it wraps.

One process, one model (a 12-layer GPT-2 config, d_model 64, random weights), one 16-token prompt.
Timed, interleaved round by round so that drift on a shared machine hits every contender alike,
in an order shuffled every round (a fixed order let each contender inherit the caches of the one
before it, which moved the ratios by several percent):

    plain       the HF forward pass
    raw hooks   the forward with 12 register_forward_hook callbacks that keep each block output
    nnpatch     a trace that saves the 12 block outputs
    nnsight     nnsight's LanguageModel doing the same (when nnsight is installed)

Every contender runs under torch.no_grad(), as an inference-only user would. Prints median milliseconds and ratios to the raw-hook run, as CPU time of this process (torch runs
on one thread, so other jobs on a shared machine barely move it) and as wall time.
Run: python benchmarks/overhead.py
"""
import argparse
import random
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import nnpatch


def build(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=1000, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def plain(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def raw_hooks(hf, ids):
    kept = []
    handles = [b.register_forward_hook(lambda m, a, o: kept.append(o)) for b in hf.transformer.h]
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in handles:
            h.remove()
    return kept


def nnpatch_trace(model, ids):
    with torch.no_grad(), model.trace(ids):
        kept = [block.output.save() for block in model.transformer.h]
    return kept


def nnsight_trace(model, ids):
    # nnsight 0.8 does not make variables assigned in a trace body visible after it inside a
    # function, so this fills a list created outside the trace.
    kept = []
    with torch.no_grad(), model.trace(ids):
        for block in model.transformer.h:
            kept.append(block.output.save())
    return kept


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf = build()
    ids = torch.randint(1, 1000, (1, 16))
    contenders = {
        "plain": lambda: plain(hf, ids),
        "raw hooks": lambda: raw_hooks(hf, ids),
    }
    model = nnpatch.LanguageModel(hf)
    contenders["nnpatch"] = lambda: nnpatch_trace(model, ids)
    try:
        import nnsight
        sight = nnsight.NNsight(build())
        contenders["nnsight"] = lambda: nnsight_trace(sight, ids)
        version = nnsight.__version__
    except Exception as e:  # noqa: BLE001 - an optional baseline
        version = f"not run ({type(e).__name__}: {e})"

    # The same numbers from every contender: the benchmark measures like for like.
    reference = raw_hooks(hf, ids)
    for name in ("nnpatch",) + (("nnsight",) if "nnsight" in contenders else ()):
        got = contenders[name]()
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, reference)), name

    cpu = {name: [] for name in contenders}
    wall = {name: [] for name in contenders}
    for _ in range(20):
        for fn in contenders.values():
            fn()
    order = list(contenders)
    shuffle = random.Random(0).shuffle
    for _ in range(args.rounds):
        shuffle(order)  # no contender always runs right after the same one (caches, allocator)
        for name in order:
            fn = contenders[name]
            c, w = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    base_cpu, base_wall = statistics.median(cpu["raw hooks"]), statistics.median(wall["raw hooks"])
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds; nnsight: {version}")
    print(f"{'':12s} {'cpu ms':>8s} {'ratio':>7s} {'wall ms':>9s} {'ratio':>7s}   (ratios to raw hooks)")
    for name in contenders:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"{name:12s} {c * 1e3:8.3f} {c / base_cpu:6.2f}x {w * 1e3:9.3f} {w / base_wall:6.2f}x")


if __name__ == "__main__":
    main()
