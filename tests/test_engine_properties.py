"""Random multi-invoke read / patch programs against a plain hook reference.

Each program has 1-4 invokes on prompts of random lengths (so the batch is padded). Invokes read
random block outputs, and patch one position of a block output with a value another invoke read
at the same block. Invokes are written in a random source order, so consumers often come before
their producers; the reference runs the prompts one at a time, producers first.
"""
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnpatch
import torch
from conftest import all_hooks, blocks, gpt2, hooked_forward, llama, prompt, word_tokenizer
from nnpatch.engine import compile_source

N_LAYERS = 3
MODELS = {"gpt2": gpt2(n_layer=N_LAYERS, seed=2), "llama": llama(n_layer=N_LAYERS, seed=2)}
WRAPPED = {k: nnpatch.LanguageModel(m, tokenizer=word_tokenizer()) for k, m in MODELS.items()}
PATH = {"gpt2": "M.transformer.h[{}]", "llama": "M.model.layers[{}]"}


def reference(hf, text, patches, sources_wanted, values):
    """Run one prompt; patches: {layer: [(pos, key)]}; records sources and every block output."""
    recorded, outs = {}, {}

    def hook(i):
        def fn(m, args, out):
            out = out.clone()
            for (layer, pos), key in sources_wanted.items():
                if layer == i:
                    recorded[key] = out[:, pos].clone()
            for pos, key in patches.get(i, []):
                out[:, pos] = values[key]
            outs[i] = out.clone()
            return out
        return fn

    return hooked_forward(hf, text, [(b, hook(i)) for i, b in enumerate(blocks(hf))]), outs, recorded


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["gpt2", "llama"]), st.integers(1, 4), st.integers(0, 2**31))
def test_random_patching_programs(arch, n_inv, seed):
    rng = random.Random(seed)
    texts = [prompt(*[rng.randint(2, 50) for _ in range(rng.randint(2, 7))]) for _ in range(n_inv)]
    lengths = [len(t.split()) for t in texts]
    rank = list(range(n_inv))
    rng.shuffle(rank)  # producers come before consumers in rank, not in source order
    patches = {k: {} for k in range(n_inv)}  # consumer -> {layer: [(pos, key)]}
    sources = {k: {} for k in range(n_inv)}  # producer -> {(layer, pos): key}
    for k in range(n_inv):
        producers = [j for j in range(n_inv) if rank[j] < rank[k]]
        if producers and rng.random() < 0.8:
            j = rng.choice(producers)
            layer = rng.randrange(N_LAYERS)
            src_pos, dst_pos = rng.randrange(lengths[j]), rng.randrange(lengths[k])
            key = f"s{j}_{layer}_{src_pos}"
            sources[j][(layer, src_pos)] = key
            patches[k].setdefault(layer, []).append((dst_pos, key))
    reads = {k: sorted(rng.sample(range(N_LAYERS), rng.randint(0, N_LAYERS))) for k in range(n_inv)}

    lines = ["with M.trace() as tracer:"]
    for k in range(n_inv):
        lines.append(f"    with tracer.invoke({texts[k]!r}):")
        for layer in range(N_LAYERS):
            block = PATH[arch].format(layer)
            for (l, pos), key in sources[k].items():
                if l == layer:
                    lines.append(f"        {key} = {block}.output[:, {pos}].clone()")
            for pos, key in patches[k].get(layer, []):
                lines.append(f"        {block}.output[:, {pos}] = {key}")
            if layer in reads[k]:
                lines.append(f"        r{k}_{layer} = {block}.output.clone()")
        lines.append(f"        logits{k} = M.lm_head.output")
    program = "\n".join(lines) + "\n"
    ns = {"M": WRAPPED[arch]}
    exec(compile_source(program, f"<patch-program-{seed}-{arch}>"), ns)

    hf = MODELS[arch]
    values = {}
    for k in sorted(range(n_inv), key=lambda k: rank[k]):
        logits, outs, recorded = reference(hf, texts[k], patches[k], sources[k], values)
        values.update(recorded)
        assert torch.allclose(ns[f"logits{k}"], logits, atol=1e-4, rtol=1e-4), program
        for layer in reads[k]:
            assert torch.allclose(ns[f"r{k}_{layer}"], outs[layer], atol=1e-4, rtol=1e-4), program
    assert all_hooks(hf) == 0
