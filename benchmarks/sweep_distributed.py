"""One process against several: a distributed activation-patching sweep's cells per second and
parallel efficiency on this machine.

The model is a random-weight GPT-2 config saved to a temporary folder, so that every process
loads the same weights; the sweep is resid_pre by layer x position over prompt pairs of 16
tokens. The one-process baseline runs in a fresh process with the same number of threads as
each rank (1 by default), then `torchrun --standalone --nproc-per-node N` runs the same sweep
with `distributed=True`; each side is timed from a barrier to the returned grid, and the grids
are checked equal. Efficiency = (cells/s with N processes) / (N x cells/s with one).

    python benchmarks/sweep_distributed.py                 # 1 vs 2 processes
    python benchmarks/sweep_distributed.py --nproc 4 --pairs 64 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def build(folder: str, layers: int, width: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=8, vocab_size=2000,
                               bos_token_id=0, eos_token_id=0)).eval().save_pretrained(folder)


def data(n_pairs: int, n_tokens: int = 16):
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(1, 2000, (n_pairs, n_tokens), generator=g)
    corrupt = clean.clone()
    corrupt[:, 4] = torch.randint(1, 2000, (n_pairs,), generator=g)
    return [r.tolist() for r in clean], [r.tolist() for r in corrupt], clean[:, 0].tolist(), clean[:, 1].tolist()


def worker(folder: str, n_pairs: int, out: str, distributed: bool) -> None:
    """One process of a run: load, warm up, time the sweep, write the grid and the time (rank 0)."""
    import nnpatch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging
    logging.disable_progress_bar()
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    clean, corrupt, answer, wrong = data(n_pairs)
    options = dict(metric="logit_diff_raw", site="resid_pre", by=("layer", "pos"), progress=False)
    nnpatch.activation_patching(model, clean[:1], corrupt[:1], answer=answer[0], wrong=wrong[0], layers=[0],
                                distributed=False, **options)  # warm-up
    if distributed:
        import torch.distributed as dist
        from nnpatch.patching.distributed import ranks_for
        ranks_for(True)  # starts the process group
        dist.barrier()
    start = time.perf_counter()
    result = nnpatch.activation_patching(model, clean, corrupt, answer=answer, wrong=wrong,
                                         distributed=distributed, **options)
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"seconds": seconds, "values": result.values, "cells": result.values.numel()}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default: 1)")
    parser.add_argument("--worker", nargs=3, metavar=("FOLDER", "OUT", "DISTRIBUTED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        folder, out, distributed = args.worker
        worker(folder, args.pairs, out, distributed == "1")
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    common = ["--pairs", str(args.pairs), "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as folder:
        build(folder, args.layers, args.width)
        one, many = os.path.join(folder, "one.pt"), os.path.join(folder, "many.pt")
        subprocess.run([sys.executable, __file__, *common, "--worker", folder, one, "0"], check=True, env=env)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={args.nproc}", __file__, *common, "--worker", folder, many, "1"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        a, b = torch.load(one), torch.load(many)
    assert torch.allclose(a["values"], b["values"], atol=1e-5), "the distributed grid differs"
    rate_one, rate_many = a["cells"] / a["seconds"], b["cells"] / b["seconds"]
    print(f"activation patching, resid_pre by layer x position: GPT-2 config {args.layers} layers, width "
          f"{args.width}; {args.pairs} pairs of 16 tokens ({a['cells']} cells); {args.threads} thread(s) per "
          f"process, {os.cpu_count()} CPUs")
    print(f"{'processes':>10} {'seconds':>9} {'cells/s':>9} {'speed-up':>9} {'efficiency':>11}")
    print(f"{1:>10} {a['seconds']:>9.2f} {rate_one:>9.1f} {1.0:>9.2f} {1.0:>11.2f}")
    print(f"{args.nproc:>10} {b['seconds']:>9.2f} {rate_many:>9.1f} {rate_many / rate_one:>9.2f} "
          f"{rate_many / rate_one / args.nproc:>11.2f}")
    print(json.dumps({"one_s": a["seconds"], "many_s": b["seconds"], "nproc": args.nproc,
                      "efficiency": rate_many / rate_one / args.nproc}))


if __name__ == "__main__":
    main()
