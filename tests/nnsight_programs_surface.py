"""nnsight programs for the rest of the tracing surface: tracer.cache, model.session, module.skip,
tracer.stop, model.scan, model.edit.

Registered into the same corpus as tests/nnsight_programs.py (imported by
tests/test_nnsight_differential.py), so each runs on nnsight 0.8.1 as the oracle and on nnpatch,
on the same weights. Programs that edit a model undo their edits before they return (the models
are shared by every program of a kind).
"""
from __future__ import annotations

from nnsight_programs import program

SURFACE = ("gpt2", "llama", "ioi")


# -- tracer.cache ---------------------------------------------------------------------------------

@program(*SURFACE)
def cache_every_module(model, S):
    with model.trace(S.A) as tracer:
        cache = tracer.cache()
    return {"h0": S.layers(cache.model)[0].output, "last": S.layers(cache.model)[S.n - 1].output,
            "mlp1": S.mlp(cache.model, 1).output, "norm": S.norm(cache.model).output,
            "logits": cache.model.lm_head.output}


@program(*SURFACE)
def cache_listed_modules_with_inputs(model, S):
    with model.trace(S.B) as tracer:
        cache = tracer.cache(modules=[S.layers(model)[1], S.mlp(model, 0)], include_inputs=True)
    return {"h1": S.layers(cache.model)[1].output, "h1_in": S.layers(cache.model)[1].input,
            "mlp0": S.mlp(cache.model, 0).output, "mlp0_in": S.mlp(cache.model, 0).input,
            "n": len(cache.keys())}


@program(*SURFACE)
def cache_sees_the_edit(model, S):
    with model.trace(S.A) as tracer:
        cache = tracer.cache(modules=[S.layers(model)[0], S.layers(model)[1]])
        S.layers(model)[0].output[:, -1] *= 3
    return {"h0": S.layers(cache.model)[0].output, "h1": S.layers(cache.model)[1].output}


@program(*SURFACE)
def cache_per_invoke_rows(model, S):
    with model.trace() as tracer:
        with tracer.invoke(S.A):
            first = tracer.cache(modules=[S.layers(model)[1]])
        with tracer.invoke(S.SHORT):
            second = tracer.cache(modules=[S.layers(model)[1]])
            S.layers(model)[0].output[:] *= 0.5
    # nnsight keeps the batch's left padding in the short invoke's rows; nnpatch shows an invoke
    # its own positions only (batching.Rows.narrow): the prompt's own positions are compared
    n = S.len(S.SHORT)
    return {"a": S.layers(first.model)[1].output, "short": S.layers(second.model)[1].output[:, -n:]}


@program(*SURFACE)
def cache_one_token_prompt(model, S):
    with model.trace(S.ONE) as tracer:
        cache = tracer.cache(modules=[S.attn(model, 0), S.layers(model)[0]])
    return {"attn": S.attn(cache.model, 0).output[0], "h0": S.layers(cache.model)[0].output}


# -- module.skip --------------------------------------------------------------------------------

@program(*SURFACE)
def skip_block_with_its_input(model, S):
    with model.trace(S.A):
        S.layers(model)[1].skip(S.layers(model)[1].input)
        logits = model.lm_head.output.save()
    return {"logits": logits}


@program(*SURFACE)
def skip_mlp_with_a_value_read_earlier(model, S):
    with model.trace(S.B):
        h = S.ln2(model, 0).output
        S.mlp(model, 0).skip(h * 0.25)
        out = S.layers(model)[0].output.save()
        logits = model.lm_head.output.save()
    return {"h0": out, "logits": logits}


@program(*SURFACE)
def skip_two_blocks(model, S):
    with model.trace(S.C):
        S.layers(model)[0].skip(S.layers(model)[0].input)
        S.layers(model)[2].skip(S.layers(model)[2].input * 2)
        logits = model.lm_head.output.save()
    return {"logits": logits}


# -- tracer.stop ----------------------------------------------------------------------------------

@program(*SURFACE)
def stop_after_a_cache(model, S):
    with model.trace(S.A) as tracer:
        cache = tracer.cache(modules=[S.layers(model)[0], S.layers(model)[1]])
        h = S.layers(model)[1].output.save()
        tracer.stop()
    return {"h": h, "h0": S.layers(cache.model)[0].output, "h1": S.layers(cache.model)[1].output}


# -- model.scan -------------------------------------------------------------------------------------

@program(*SURFACE)
def scan_reads_shapes(model, S):
    with model.scan(S.A):
        hidden = S.save(tuple(S.layers(model)[0].output.shape))
        logits = S.save(tuple(model.lm_head.output.shape))
    return {"hidden": hidden, "logits": logits}


# -- model.edit -------------------------------------------------------------------------------------

@program(*SURFACE)
def edit_a_copy(model, S):
    with model.edit() as (tracer, edited):
        S.layers(edited)[0].output[:] *= 2
    with edited.trace(S.A):
        steered = edited.lm_head.output.save()
    with model.trace(S.A):
        plain = model.lm_head.output.save()
    return {"steered": steered, "plain": plain}


@program(*SURFACE)
def edit_in_place_then_clear(model, S):
    with model.edit(inplace=True):
        S.mlp(model, 1).output[:] = 0
    try:
        with model.trace(S.B):
            edited = model.lm_head.output.save()
    finally:
        model.clear_edits()
    with model.trace(S.B):
        cleared = model.lm_head.output.save()
    return {"edited": edited, "cleared": cleared}


@program(*SURFACE)
def edit_then_the_trace_reads_the_edited_value(model, S):
    with model.edit() as (tracer, edited):
        S.layers(edited)[1].output[:, -1] = 0
    with edited.trace(S.C):
        h1 = S.layers(edited)[1].output.save()
        S.layers(edited)[2].output[:] *= 0.5
        logits = edited.lm_head.output.save()
    return {"h1": h1, "logits": logits}


# -- model.session ----------------------------------------------------------------------------------

@program(*SURFACE)
def session_patches_a_value_from_an_earlier_trace(model, S):
    with model.session():
        with model.trace(S.A):
            clean = S.layers(model)[1].output
        with model.trace(S.B):
            S.layers(model)[1].output[:, -1] = clean[:, -1]
            logits = model.lm_head.output.save()
    return {"logits": logits}


@program(*SURFACE)
def session_three_traces_in_a_loop(model, S):
    outs = []
    with model.session():
        scale = 1.0
        for text in (S.A, S.B, S.C):
            with model.trace(text):
                S.layers(model)[0].output[:] *= scale
                outs.append(model.lm_head.output[:, -1].save())
            scale = scale * 0.5
    return {"outs": list(outs)}



# -- .source ----------------------------------------------------------------------------------------

@program("gpt2e", "llamae")
def source_reads_the_attention_weights(model, S):
    with model.trace(S.A):
        weights = S.attn(model, 1).source.attention_interface_1.output[1].save()
        logits = model.lm_head.output.save()
    return {"weights": weights, "logits": logits}


@program("gpt2e", "llamae")
def source_edits_the_attention_weights(model, S):
    with model.trace(S.B):
        S.attn(model, 0).source.attention_interface_1.output[1][:, :, -1] = 0
        h0 = S.layers(model)[0].output.save()
        logits = model.lm_head.output.save()
    return {"h0": h0, "logits": logits}


@program(*SURFACE)
def source_edits_the_mlp_activation(model, S):
    act = "self_act_0" if S.gpt2 else "self_act_fn_0"
    with model.trace(S.C):
        before = getattr(S.mlp(model, 1).source, act).output.clone().save()
        getattr(S.mlp(model, 1).source, act).output[:, -1] = 0
        out = S.mlp(model, 1).output.save()
        logits = model.lm_head.output.save()
    return {"before": before, "out": out, "logits": logits}


# -- rename= ----------------------------------------------------------------------------------------

RENAME = {"transformer.h": "layers", "model.layers": "layers", "attn": "attention", "self_attn": "attention"}


@program(*SURFACE)
def rename_reads_and_edits_through_aliases(model, S):
    renamed = type(model)(model._module, tokenizer=model.tokenizer, rename=RENAME)
    with renamed.trace(S.A):
        renamed.layers[0].output[:, -1] *= 0.5
        attention = renamed.layers[1].attention.output[0].save()
        logits = renamed.lm_head.output.save()
    return {"attention": attention, "logits": logits}


@program(*SURFACE)
def rename_in_a_cache(model, S):
    renamed = type(model)(model._module, tokenizer=model.tokenizer, rename=RENAME)
    with renamed.trace(S.B) as tracer:
        cache = tracer.cache(modules=[renamed.layers[2], renamed.layers[0].attention])
    return {"h2": cache.model.layers[2].output, "attn0": cache.model.layers[0].attention.output[0]}
