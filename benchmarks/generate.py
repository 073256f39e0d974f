"""What a generation trace costs over Hugging Face's `generate` with equivalent raw hooks.

One process, one model (a GPT-2-small-shaped config: 12 layers, d_model 768, 12 heads, vocabulary
50257, random weights), one 16-token prompt, 32 new tokens (greedy, min_new_tokens=32 so that
every contender makes every step), and a steering vector added to block 6's output at the last
position at every step. Timed, interleaved round by round so that drift on a shared machine hits
every contender alike:

    raw hooks   hf.generate with one register_forward_hook that adds the vector
    nnpatch     `with model.generate(...)`: `for step in tracer.all(): h[6].output[:, -1] += v`
    nnsight     nnsight 0.8's LanguageModel running the same program (when installed)

The three must generate the same tokens (checked first). Prints median seconds and ratios to the
raw-hook run (CPU time of this process, torch on one thread, and wall time), and the peak growth
of allocated memory during one run of each (on the CPU the C heap in use, sampled every 0.2 ms;
on a GPU, torch.cuda.max_memory_allocated).
Run: python benchmarks/generate.py [--rounds N] [--device cuda]
"""
import argparse
import ctypes
import statistics
import threading
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import nnpatch

LAYER, NEW = 6, 32


def build(device, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                     bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    return GPT2LMHeadModel(cfg).eval().to(device)


GENERATE = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=50256)


def raw_hooks(hf, ids, v):
    def steer(module, args, output):
        output[:, -1] += v
    handle = hf.transformer.h[LAYER].register_forward_hook(steer)
    try:
        return hf.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE)
    finally:
        handle.remove()


def nnpatch_generate(model, ids, v):
    with model.generate(ids, **GENERATE) as tracer:
        for step in tracer.all():
            model.transformer.h[LAYER].output[:, -1] += v
        out = tracer.result
    return out


def nnsight_generate(model, ids, v):
    # bounded: nnsight ends an open `tracer.all()` by outrunning the generation, with a warning,
    # and skips the statements after the loop
    with model.generate(ids, **GENERATE) as tracer:
        for step in tracer.iter[:NEW]:
            model.transformer.h[LAYER].output[:, -1] += v
        out = tracer.result.save()
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> int:
    """Bytes the C heap has handed out (glibc's mallinfo2: small blocks plus mmapped ones), which
    is where torch's CPU tensors live; unlike resident memory it drops when tensors are freed."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


_LIBC = ctypes.CDLL(None)
_LIBC.mallinfo2.restype = _MallInfo2


def peak_memory(fn, device) -> float:
    """MiB: the peak growth of allocated memory during one run (CUDA: torch's own counter; CPU:
    the C heap in use, sampled every 0.2 ms)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _heap_in_use()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _heap_in_use())
            time.sleep(0.0002)
    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return (peak[0] - base) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    hf = build(args.device)
    ids = torch.randint(0, 50000, (1, 16), generator=torch.Generator().manual_seed(1)).to(args.device)
    v = 0.5 * torch.randn(768, generator=torch.Generator().manual_seed(2)).to(args.device)
    model = nnpatch.LanguageModel(hf)
    contenders = {"raw hooks": lambda: raw_hooks(hf, ids, v),
                  "nnpatch": lambda: nnpatch_generate(model, ids, v)}
    try:
        import warnings

        import nnsight
        from transformers import PreTrainedTokenizerFast
        from tokenizers import Tokenizer, models
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<eos>": 0}, unk_token="<eos>")),
                                      eos_token="<eos>", pad_token="<eos>")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sight = nnsight.LanguageModel(build(args.device), tokenizer=tok)
        contenders["nnsight"] = lambda: nnsight_generate(sight, ids, v)
        version = nnsight.__version__
    except Exception as e:  # noqa: BLE001 - an optional baseline
        version = f"not run ({type(e).__name__}: {e})"

    with torch.no_grad():
        reference = raw_hooks(hf, ids, v)
        unsteered = hf.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE)
        assert not torch.equal(reference, unsteered), "the steering vector must change the tokens"
        for name in [n for n in contenders if n != "raw hooks"]:
            try:
                got = contenders[name]()
            except Exception as e:  # noqa: BLE001 - reported, then left out
                print(f"{name}: failed ({type(e).__name__}: {e}); left out")
                del contenders[name]
                continue
            assert torch.equal(got.to(reference.device), reference), f"{name} generated other tokens"

    cpu = {name: [] for name in contenders}
    wall = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            c, w = time.process_time(), time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    memory = {name: peak_memory(fn, args.device) for name, fn in contenders.items()}
    base_cpu, base_wall = statistics.median(cpu["raw hooks"]), statistics.median(wall["raw hooks"])
    print(f"torch {torch.__version__}, {args.device}, {NEW} new tokens, {args.rounds} interleaved rounds; "
          f"nnsight: {version}")
    print(f"{'':10s} {'cpu s':>8s} {'ratio':>7s} {'wall s':>8s} {'ratio':>7s} {'peak MiB':>9s}   (ratios to raw hooks)")
    for name in contenders:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"{name:10s} {c:8.3f} {c / base_cpu:6.2f}x {w:8.3f} {w / base_wall:6.2f}x {memory[name]:9.1f}")


if __name__ == "__main__":
    main()
