"""Edge attribution (EAP, EAP-IG with 5 steps) on a GPT-2-small-shaped model, as multiples of one
forward pass, and against patching every edge one at a time.

Ratios are printed for CPU time of this process (torch on one thread, so other jobs on a shared
machine barely move them) and for wall time.

The model is benchmarks/sweep.py's: GPT-2 small's shape (12 layers, d_model 768, 12 heads, vocab
50257), random weights; 8 prompt pairs of 15 tokens. Its circuit graph has 32,491 edges. Timed in
one process, interleaved round by round:

    forward     one plain forward pass of the 8 clean prompts (the unit)
    EAP         nnpatch.edge_attribution(method="eap"): reference runs, one forward + backward
    EAP-IG      nnpatch.edge_attribution(method="eap-ig", steps=5)
    one edge    nnpatch's patched run of one edge (all pairs): the naive method's unit

The naive method patches each edge alone: edges x (one edge) seconds, printed as forward passes.

    python benchmarks/circuits.py --rounds 3 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import nnpatch
from nnpatch.patching.circuit import Circuit
from nnpatch.patching.circuit_job import CircuitJob
from nnpatch.patching.faithfulness import score_circuits
from sweep import build, data, load


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        build(folder)
        hf = load(folder)
    clean, corrupt, answer, wrong = data(args.pairs, args.tokens)
    kw = dict(answer=answer.tolist(), wrong=wrong.tolist(), metric="logit_diff_raw")
    c, k = clean.tolist(), corrupt.tolist()

    def forward():
        with torch.no_grad():
            hf(clean)

    graph = nnpatch.graph(hf)
    cj = CircuitJob(hf, c, k, kw["answer"], kw["wrong"], kw["metric"])
    key = nnpatch.edge_attribution(hf, c, k, **kw).key
    one = torch.ones(len(graph.edges), dtype=torch.bool)
    one[len(graph.edges) // 2] = False  # every edge intact but one

    def one_edge():
        score_circuits(cj, [Circuit(key, graph.edges, torch.zeros(len(graph.edges)), one)], "patch")

    contenders = {
        "forward": forward,
        "EAP": lambda: nnpatch.edge_attribution(hf, c, k, method="eap", **kw),
        "EAP-IG (5 steps)": lambda: nnpatch.edge_attribution(hf, c, k, method="eap-ig", steps=5, **kw),
        "one edge": one_edge,
    }
    for fn in contenders.values():  # warm-up
        fn()
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t, w = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - t)
            wall[name].append(time.perf_counter() - w)
    print(f"{graph}; {args.pairs} pairs x {args.tokens} tokens; {args.threads} thread(s); "
          f"median of {args.rounds} rounds")
    print(f"{'method':<22}{'CPU s':>9}{'forwards':>10}{'wall s':>9}{'forwards':>10}")
    med = {}
    for name in contenders:
        med[name] = (statistics.median(cpu[name]), statistics.median(wall[name]))
    unit = med["forward"]
    for name, (c_s, w_s) in med.items():
        print(f"{name:<22}{c_s:>9.3f}{c_s / unit[0]:>10.2f}{w_s:>9.3f}{w_s / unit[1]:>10.2f}")
    naive = [m * len(graph.edges) for m in med["one edge"]]
    print(f"{'naive (every edge)':<22}{naive[0]:>9.0f}{naive[0] / unit[0]:>10.0f}{naive[1]:>9.0f}{naive[1] / unit[1]:>10.0f}")
    print(f"CPU time: EAP is {naive[0] / med['EAP'][0]:.0f}x faster than patching every edge alone, "
          f"EAP-IG {naive[0] / med['EAP-IG (5 steps)'][0]:.0f}x")


if __name__ == "__main__":
    main()
