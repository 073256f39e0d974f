"""What tracer.cache(), model.edit() and module.skip() cost over equivalent raw PyTorch hooks.

One process, one model (a 12-layer GPT-2 config, d_model 64, random weights), one 16-token
prompt, torch on one thread, interleaved round by round. Three tasks, each with its raw-hook
baseline, nnpatch, and nnsight 0.8.1 when it is installed:

    cache   every module's output kept (detached copies), read after the forward
    edit    a steering vector added to block 3's output by a stored edit, logits kept
    skip    block 5 not run (its input passed on), logits kept

Prints median CPU milliseconds and the ratio to the task's raw-hook run. Every contender's
values are checked against the raw-hook run's before timing.
Run: python benchmarks/surface.py [--rounds N]
"""
import argparse
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


def hooked(hf, ids, hooks):
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        for h in handles:
            h.remove()


# -- raw hooks ------------------------------------------------------------------------------------

def raw_cache(hf, ids):
    kept = {}

    def keep(name):
        return lambda m, a, o: kept.setdefault(name, o.detach().clone() if torch.is_tensor(o) else o)
    hooked(hf, ids, [(m, keep(n)) for n, m in hf.named_modules()])
    return kept


def raw_edit(hf, ids, vec):
    return hooked(hf, ids, [(hf.transformer.h[3], lambda m, a, o: o + vec)])


def raw_skip(hf, ids):
    # the baseline still runs block 5 (hooks cannot skip a forward) and replaces its output
    return hooked(hf, ids, [(hf.transformer.h[5], lambda m, a, o: a[0])])


# -- nnpatch ----------------------------------------------------------------------------------------

def np_cache(model, ids):
    with torch.no_grad(), model.trace(ids) as tracer:
        cache = tracer.cache()
    return cache


def np_edit(edited, ids):
    with torch.no_grad(), edited.trace(ids):
        logits = edited.lm_head.output
    return logits


def np_skip(model, ids):
    with torch.no_grad(), model.trace(ids):
        model.transformer.h[5].skip(model.transformer.h[5].input)
        logits = model.lm_head.output
    return logits


# -- nnsight ----------------------------------------------------------------------------------------

def ns_cache(model, ids):
    with torch.no_grad(), model.trace(ids) as tracer:
        cache = tracer.cache()
    return cache


def ns_edit(edited, ids):
    out = []
    with torch.no_grad(), edited.trace(ids):
        out.append(edited.lm_head.output.save())
    return out[0]


def ns_skip(model, ids):
    out = []
    with torch.no_grad(), model.trace(ids):
        model.transformer.h[5].skip(model.transformer.h[5].input)
        out.append(model.lm_head.output.save())
    return out[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf = build()
    ids = torch.randint(1, 1000, (1, 16))
    vec = torch.randn(64)
    model = nnpatch.LanguageModel(hf)
    with model.edit() as (_, edited):
        edited.transformer.h[3].output[:] += vec
    tasks = {
        "cache": {"raw hooks": lambda: raw_cache(hf, ids), "nnpatch": lambda: np_cache(model, ids)},
        "edit": {"raw hooks": lambda: raw_edit(hf, ids, vec), "nnpatch": lambda: np_edit(edited, ids)},
        "skip": {"raw hooks": lambda: raw_skip(hf, ids), "nnpatch": lambda: np_skip(model, ids)},
    }
    try:
        import nnsight
        sight = nnsight.NNsight(build())
        with sight.edit() as (_, sight_edited):
            sight_edited.transformer.h[3].output[:] += vec
        tasks["cache"]["nnsight"] = lambda: ns_cache(sight, ids)
        tasks["edit"]["nnsight"] = lambda: ns_edit(sight_edited, ids)
        tasks["skip"]["nnsight"] = lambda: ns_skip(sight, ids)
        version = nnsight.__version__
    except Exception as e:  # noqa: BLE001 - an optional baseline
        version = f"not run ({type(e).__name__}: {e})"

    # like for like: every contender computes the raw-hook run's values
    ref_cache = raw_cache(hf, ids)
    got = np_cache(model, ids)
    assert all(torch.allclose(got[path].output, value, atol=1e-5)
               for path, value in ref_cache.items() if torch.is_tensor(value))
    for task in ("edit", "skip"):
        want = tasks[task]["raw hooks"]()
        for name, fn in tasks[task].items():
            assert torch.allclose(fn(), want, atol=1e-5), (task, name)

    times = {(t, n): [] for t, contenders in tasks.items() for n in contenders}
    for _ in range(5):
        for contenders in tasks.values():
            for fn in contenders.values():
                fn()
    for _ in range(args.rounds):
        for task, contenders in tasks.items():
            for name, fn in contenders.items():
                c = time.process_time()
                fn()
                times[(task, name)].append(time.process_time() - c)
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds; nnsight: {version}")
    print(f"{'task':6s} {'contender':10s} {'cpu ms':>8s} {'ratio':>7s}   (ratio to the task's raw hooks)")
    for task, contenders in tasks.items():
        base = statistics.median(times[(task, "raw hooks")])
        for name in contenders:
            c = statistics.median(times[(task, name)])
            print(f"{task:6s} {name:10s} {c * 1e3:8.3f} {c / base:6.2f}x")


if __name__ == "__main__":
    main()
