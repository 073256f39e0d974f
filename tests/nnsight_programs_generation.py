"""Generation programs of the nnsight differential corpus (see tests/nnsight_programs.py).

Each runs `model.generate(...)` on nnsight 0.8.1 (the oracle) and on nnpatch, on the same
weights, and returns what it saved: generated ids, per-step hidden states and logits, under
steering at every step, at chosen steps (`tracer.iter[k]`, `[a:b]`, `[[i, j]]`), in nnsight's
`with tracer.all():` block form, with batched invokes and with sampling. Generation is pinned to
its length with min_new_tokens, so that an end-of-sequence token of the random models cannot
stop it early, and a loop followed by more statements is bounded (`tracer.iter[:N]`): nnsight
ends an open loop (`tracer.all()`) by letting it outrun the generation, with a warning, and skips
the statements after it; nnpatch ends it cleanly after the last step and runs them (a difference
by design, tested in tests/test_generation.py).

Prompts of one program's invokes have equal lengths: nnsight hands an invoke its rows of the
padded batch, nnpatch its rows without the batch's extra left padding.
"""
from __future__ import annotations

import torch

from nnsight_programs import program


def _h(out):
    """A block's hidden state, whether the block returns a tensor or a tuple."""
    return out[0] if isinstance(out, tuple) else out


GEN = dict(do_sample=False)


@program("gpt2", "llama", "ioi")
def gen_first_step_reads(model, S):
    with model.generate(S.A, max_new_tokens=3, min_new_tokens=3, **GEN):
        h = _h(S.layers(model)[1].output).save()
        logits = model.lm_head.output.save()
        ids = model.generator.output.save()
    return {"h": h, "logits": logits, "ids": ids}


@program("gpt2", "llama", "ioi")
def gen_hidden_at_every_step(model, S):
    with model.generate(S.B, max_new_tokens=4, min_new_tokens=4, **GEN) as tracer:
        hs = S.save([])
        logits = S.save([])
        for step in tracer.all():
            hs.append(_h(S.layers(model)[2].output)[:, -1].save())
            logits.append(model.lm_head.output[:, -1].save())
    return {"hs": hs, "logits": logits}


@program("gpt2", "llama", "ioi")
def gen_steer_every_step(model, S):
    v = 3 * S.vec(7)
    with model.generate(S.A, max_new_tokens=5, min_new_tokens=5, **GEN) as tracer:
        logits = S.save([])
        for step in tracer.all():
            _h(S.layers(model)[1].output)[:, -1] += v
            logits.append(model.lm_head.output[:, -1].save())
    with model.generate(S.A, max_new_tokens=5, min_new_tokens=5, **GEN) as tracer:
        for step in tracer.iter[:5]:  # bounded: nnsight skips what follows an open loop
            _h(S.layers(model)[1].output)[:, -1] += v
        ids = tracer.result.save()
    return {"logits": logits, "ids": ids}


@program()
def gen_patch_one_step(model, S):
    v = 4 * S.vec(3)
    with model.generate(S.C, max_new_tokens=4, min_new_tokens=4, **GEN) as tracer:
        for step in tracer.iter[2]:
            _h(S.layers(model)[0].output)[:, -1] = v
        ids = tracer.result.save()
    return {"ids": ids}


@program()
def gen_patch_only_the_first_step(model, S):
    v = 4 * S.vec(5)
    with model.generate(S.C, max_new_tokens=4, min_new_tokens=4, **GEN):
        _h(S.layers(model)[1].output)[:, -1] += v
        ids = model.generator.output.save()
    return {"ids": ids}


@program()
def gen_iter_slice_and_list(model, S):
    with model.generate(S.A, max_new_tokens=5, min_new_tokens=5, **GEN) as tracer:
        mid = S.save([])
        for step in tracer.iter[1:3]:
            mid.append(_h(S.layers(model)[1].output).save())
    with model.generate(S.A, max_new_tokens=5, min_new_tokens=5, **GEN) as tracer:
        picked = S.save([])
        for step in tracer.iter[[0, 3]]:
            picked.append(model.lm_head.output[:, -1].save())
    return {"mid": mid, "picked": picked}


@program()
def gen_with_all_block_form(model, S):
    v = 2 * S.vec(11)
    with model.generate(S.B, max_new_tokens=3, min_new_tokens=3, **GEN) as tracer:
        logits = S.save([])
        with tracer.all():
            S.mlp(model, 1).output[:, -1] += v
            logits.append(model.lm_head.output[:, -1].save())
    return {"logits": logits}


@program()
def gen_two_invokes_batched(model, S):
    v = 3 * S.vec(13)
    with model.generate(max_new_tokens=3, min_new_tokens=3, **GEN) as tracer:
        with tracer.invoke(S.A):
            a = S.save([])
            for step in tracer.all():
                a.append(model.lm_head.output[:, -1].save())
        with tracer.invoke(S.B):
            b = S.save([])
            for step in tracer.all():
                _h(S.layers(model)[1].output)[:, -1] += v
                b.append(model.lm_head.output[:, -1].save())
    return {"a": a, "b": b}


@program()
def gen_one_token_prompt_one_new_token(model, S):
    with model.generate(S.ONE, max_new_tokens=1, **GEN):
        h = _h(S.layers(model)[0].output).save()
        ids = model.generator.output.save()
    return {"h": h, "ids": ids}


@program()
def gen_sampling_with_a_seed(model, S):
    torch.manual_seed(5)
    with model.generate(S.A, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=10,
                        temperature=2.0):
        ids = model.generator.output.save()
    return {"ids": ids}


@program()
def gen_cross_invoke_with_a_barrier_each_step(model, S):
    # nnsight passes a value between invokes at a barrier; nnpatch accepts the same program
    with model.generate(max_new_tokens=3, min_new_tokens=3, **GEN) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(S.A):
            for step in tracer.iter[:3]:
                src = _h(S.layers(model)[1].output)[:, -1]
                barrier()
        with tracer.invoke(S.B):
            out = S.save([])
            for step in tracer.iter[:3]:
                barrier()
                _h(S.layers(model)[1].output)[:, -1] = src
                out.append(model.lm_head.output[:, -1].save())
    return {"out": out}
