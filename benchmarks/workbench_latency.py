"""Run-to-heatmap latency of the patching workbench on the bundled ioi model.

What a click on Run costs in the kernel: checking the input, the sweep (resid_pre, layer x pos,
one prompt pair), the heatmap figure and the widget updates. Printed next to the same sweep called
directly through the Python API, as a ratio, so the workbench's own overhead is visible.
The target is under 2 s on a 2-core CPU.

    python benchmarks/workbench_latency.py [--repeat 7] [--threads N]
"""
import argparse
import statistics
import time

import torch

import nnpatch


def timed(fn, repeat: int) -> float:
    fn()  # warm-up: first-call costs (imports, allocator) are not what a second click pays
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = nnpatch.models.load("ioi")
    pair = nnpatch.tasks.ioi(1, seed=0)[0]
    wb = nnpatch.Workbench(model, pairs=[pair])

    def api():
        nnpatch.activation_patching(model, pair.clean, pair.corrupt, answer=pair.answer, wrong=pair.wrong,
                                    site="resid_pre", by=("layer", "pos"), progress=False)

    def click_run():
        wb.run()
        assert not wb.controls.message, wb.controls.message

    api_s, run_s = timed(api, args.repeat), timed(click_run, args.repeat)
    cells = wb.controls.summary["cells"]
    print(f"ioi model, one pair of {len(model.to_tokens(pair.clean))} tokens, resid_pre, layer x pos "
          f"({cells} cells), torch threads {torch.get_num_threads()}, median of {args.repeat}")
    print(f"  activation_patching (API)        {api_s * 1000:8.1f} ms   1.00x")
    print(f"  Workbench Run -> heatmap figure  {run_s * 1000:8.1f} ms   {run_s / api_s:.2f}x")
    print(f"  target < 2000 ms: {'met' if run_s < 2.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
