"""What a trace costs over the forward pass it wraps.

One process, one model (a 12-layer GPT-2 config, d_model 64, random weights), one 16-token prompt.
Timed, interleaved round by round so that drift on a shared machine hits every contender alike,
in an order shuffled every round (a fixed order let each contender inherit the caches of the one
before it, which moved the ratios by several percent):

    plain            the HF forward pass, `model(ids)`
    raw hooks        that forward with 12 register_forward_hook callbacks that keep each block output
    raw, no cache    the same with `use_cache=False`: the forward call a trace makes (a trace builds
                     no KV cache), so nnpatch / this row is the overhead like for like
    greenlet floor   a hand-written minimum of nnpatch's design: the body runs as a greenlet (one,
                     kept across calls) that registers a hook on the next block, pauses until the
                     model gets there, takes the output and goes on (no copies, no checks, one invoke)
    nnpatch          a trace that saves the 12 block outputs
    nnsight          nnsight's NNsight wrapper doing the same (when nnsight is installed; it calls
                     `model(ids)`, KV cache included)

Every contender runs under torch.no_grad(), as an inference-only user would. Prints median
milliseconds and ratios to the raw-hook run and to the no-cache raw-hook run, as CPU time of
this process (torch runs on one thread, so other jobs on a shared machine barely move it) and
as wall time. Two kinds of ratio: of the medians, and "paired", the median over rounds of each
round's own ratio, whose two times come from the same round. On this project's shared CI machine,
whose speed drifts by up to 1.8x within minutes, nnpatch's ratio of medians moved between 0.98x
and 1.08x in 15 runs on 2026-12-03 (1.01x-1.07x the day before), its paired ratio between 1.01x
and 1.04x (1.02x-1.05x the day before): read the paired column.
Run: python benchmarks/overhead.py
"""
import argparse
import random
import statistics
import time

import greenlet
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


def raw_hooks(hf, ids, **forward_kwargs):
    kept = []
    handles = [b.register_forward_hook(lambda m, a, o: kept.append(o)) for b in hf.transformer.h]
    try:
        with torch.no_grad():
            hf(ids, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    return kept


def greenlet_floor(hf, ids):
    """The body as a greenlet that meets the forward pass at each block, and nothing else. The
    greenlet is kept from call to call, as nnpatch keeps its invokes' greenlets: making a new one
    per call cost 60-100 us more here (a floor of 1.05x like for like instead of 1.035x, measured
    side by side on 2026-12-03)."""
    caller = greenlet.getcurrent()
    kept, handle = [], []

    def hook(module, args, output):
        handle.pop().remove()
        body.switch(output)

    def run_body():
        for block in hf.transformer.h:
            handle.append(block.register_forward_hook(hook))
            kept.append(caller.switch())  # paused until the hook hands over the block's output

    if not _FLOOR_GREENLET:
        _FLOOR_GREENLET.append(greenlet.greenlet(_run_bodies))
    body = _FLOOR_GREENLET[0]
    body.switch(run_body)  # runs until it waits for block 0
    with torch.no_grad():
        hf(ids, use_cache=False)
    return kept


_FLOOR_GREENLET: list = []


def _run_bodies(body):
    """The floor's greenlet: runs one body per call, then waits for the next."""
    while True:
        body()
        body = greenlet.getcurrent().parent.switch()


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
        "raw, no cache": lambda: raw_hooks(hf, ids, use_cache=False),
        "greenlet floor": lambda: greenlet_floor(hf, ids),
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
    for name in contenders:
        if name != "plain":
            got = contenders[name]()
            assert len(got) == len(reference), name
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
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    med_wall = {name: statistics.median(v) for name, v in wall.items()}
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds; nnsight: {version}")
    print(f"{'':15s} {'cpu ms':>8s} {'wall ms':>9s} {'/ raw hooks':>12s} {'/ raw, no cache':>16s}"
          f"   {'paired: / raw hooks':>20s} {'/ raw, no cache':>16s}   (ratios of cpu time)")
    for name in contenders:
        c, w = med_cpu[name], med_wall[name]
        print(f"{name:15s} {c * 1e3:8.3f} {w * 1e3:9.3f} {c / med_cpu['raw hooks']:11.2f}x "
              f"{c / med_cpu['raw, no cache']:15.2f}x   {paired(cpu[name], cpu['raw hooks']):19.3f}x "
              f"{paired(cpu[name], cpu['raw, no cache']):15.3f}x")


def paired(times: list[float], baseline: list[float]) -> float:
    """The median over rounds of time / baseline time in the same round."""
    return statistics.median(t / b for t, b in zip(times, baseline))


if __name__ == "__main__":
    main()
