"""How activation patching scales: time and peak memory as pairs, tokens and layers grow.

One random-weight GPT-2 config per point, resid_pre by layer x position, the logit-difference
metric, each point in a fresh process (so that memory freed by one point does not hide the next
one's peak). Each series varies one size from its base (pairs 8, tokens 16, layers 4) and prints
per point the wall and CPU seconds (CPU time: what other jobs on a shared machine distort
least), the peak memory the sweep added (CUDA: max allocated; CPU: resident set size sampled
every 2 ms), and the ratio of the CPU time to the runner's cost model's prediction (the sum of
`Runner.cost` over the batches the sweep ran and its reference runs), relative to the series'
first point: 1.0 means the cost model predicts the growth exactly. Under each series, the
fitted exponents (slope of log CPU time and log peak memory against log size).

    python benchmarks/sweep_scaling.py                       # the default series, a few minutes
    python benchmarks/sweep_scaling.py --pairs 8,64,512 --tokens 16,64 --layers 2,8
    python benchmarks/sweep_scaling.py --memory-budget 64     # MiB; pairs stream in parts

Times are wall-clock seconds on whatever else the machine is doing; compare within a series.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

import torch

VOCAB, D_MODEL, HEADS = 1000, 128, 4


def model_of(n_layers: int, n_tokens: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_embd=D_MODEL, n_head=HEADS, vocab_size=VOCAB,
                                      n_positions=max(64, n_tokens), bos_token_id=0, eos_token_id=0)).eval()


def data(n_pairs: int, n_tokens: int):
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(1, VOCAB, (n_pairs, n_tokens), generator=g)
    corrupt = clean.clone()
    corrupt[:, n_tokens // 4] = torch.randint(1, VOCAB, (n_pairs,), generator=g)
    return [r.tolist() for r in clean], [r.tolist() for r in corrupt], clean[:, 0].tolist(), clean[:, 1].tolist()


class Peak:
    """Peak memory above the level at the start: CUDA's allocator counter, else the RSS."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.peak, _rss()) - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def predicted_cost(fn):
    """Run `fn` while adding up the cost model's prediction of every forward the sweep makes."""
    from nnpatch.patching.runner import Runner
    total = [0.0]
    run, reference = Runner.run, Runner.reference_runs

    def counted_run(self, rows, mode):
        layer = min(r.layer for r in rows) if self.fast else 0
        pos = min(r.pos for r in rows) if self.kv else 0
        total[0] += self.cost(len(rows), (layer, pos))
        return run(self, rows, mode)

    def counted_reference(self):
        total[0] += 2 * self.cost(self.group.n, (0, 0))
        return reference(self)
    Runner.run, Runner.reference_runs = counted_run, counted_reference
    try:
        out = fn()
    finally:
        Runner.run, Runner.reference_runs = run, reference
    return out, total[0]


def point(n_pairs: int, n_tokens: int, n_layers: int, device: torch.device, budget: int | None):
    import nnpatch
    hf = model_of(n_layers, n_tokens).to(device)
    clean, corrupt, answer, wrong = data(n_pairs, n_tokens)
    nnpatch.activation_patching(hf, clean[:1], corrupt[:1], answer=answer[0], wrong=wrong[0],
                                progress=False, layers=[0])  # warm-up
    with Peak(device) as peak:
        start, cpu = time.perf_counter(), time.process_time()
        result, cost = predicted_cost(lambda: nnpatch.activation_patching(
            hf, clean, corrupt, answer=answer, wrong=wrong, metric="logit_diff_raw", site="resid_pre",
            by=("layer", "pos"), memory_budget=budget, progress=False))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert torch.isfinite(result.values).all()
    return {"wall": seconds, "cpu": cpu, "peak": peak.bytes, "cost": cost}


def in_process(sizes, args) -> dict:
    """One point measured in a fresh Python process."""
    command = [sys.executable, __file__, "--point", ",".join(map(str, sizes)), "--device", args.device,
               "--threads", str(args.threads)]
    if args.memory_budget is not None:
        command += ["--memory-budget", str(args.memory_budget)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def series(name, sizes, make, args):
    print(f"\n{name:>8} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9} {'cost units':>11} {'CPU/cost':>9}")
    cpus, peaks, first = [], [], None
    for size in sizes:
        p = in_process(make(size), args)
        first = first or p["cpu"] / p["cost"]
        cpus.append(p["cpu"])
        peaks.append(p["peak"])
        print(f"{size:>8} {p['wall']:>8.2f} {p['cpu']:>8.2f} {p['peak'] / 2**20:>9.1f} {p['cost']:>11.3g} "
              f"{p['cpu'] / p['cost'] / first:>9.2f}")
    if len(sizes) > 1:
        print(f"{'exponent':>8} {'':>8} {slope(sizes, cpus):>8.2f} {slope(sizes, [p + 2**20 for p in peaks]):>9.2f}"
              "   (CPU time ~ size^a, peak ~ size^b)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--pairs", type=ints, default=[8, 64, 512])
    parser.add_argument("--tokens", type=ints, default=[16, 64, 256])
    parser.add_argument("--layers", type=ints, default=[2, 4, 8])
    parser.add_argument("--base", type=ints, default=[8, 16, 4], help="pairs,tokens,layers of the other sizes")
    parser.add_argument("--tokens-pairs", type=int, default=1, help="pairs in the tokens series (default: 1)")
    parser.add_argument("--memory-budget", type=int, help="MiB (default: half the device's free memory)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--point", type=ints, help=argparse.SUPPRESS)  # pairs,tokens,layers: one point
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    budget = None if args.memory_budget is None else args.memory_budget << 20
    if args.point:
        print(json.dumps(point(*args.point, device, budget)))
        return
    pairs, tokens, layers = args.base
    print(f"activation patching, resid_pre by layer x position; GPT-2 config d_model {D_MODEL}, "
          f"vocab {VOCAB}; {device}, {args.threads} threads; memory budget "
          f"{'default' if budget is None else f'{args.memory_budget} MiB'}")
    series("pairs", args.pairs, lambda n: (n, tokens, layers), args)
    series("tokens", args.tokens, lambda t: (args.tokens_pairs, t, layers), args)
    series("layers", args.layers, lambda n: (pairs, tokens, n), args)


if __name__ == "__main__":
    main()
