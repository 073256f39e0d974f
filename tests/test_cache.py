"""tracer.cache(): every (or the listed) module's output and input, per invoke and per call,
against forward hooks on every module of the same weights."""
import pytest
import torch

import nnpatch
from conftest import all_hooks, block_envoys, blocks, close, gpt2, ids, llama, prompt, word_tokenizer


@pytest.fixture(params=["gpt2", "llama"])
def hf(request):
    return {"gpt2": gpt2, "llama": llama}[request.param]()


@pytest.fixture
def lm(hf):
    return nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())


def recorded(hf, text, edits=None, inputs=False):
    """{path: [output per call]} (or inputs) of every module in a plain forward with hooks;
    edits: {path: fn(output) -> output} applied first (the reference for post-edit values)."""
    got, handles = {}, []
    for path, module in hf.named_modules():
        def hook(m, args, kwargs, out, path=path):
            if edits and path in edits:
                out = edits[path](out)
            if inputs:
                value = args[0] if args else kwargs.get("hidden_states", next(
                    (v for v in kwargs.values() if isinstance(v, torch.Tensor)), None))
            else:
                value = out
            got.setdefault(path, []).append(value.detach().clone() if isinstance(value, torch.Tensor) else value)
            return out
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            hf(ids(text))
    finally:
        for h in handles:
            h.remove()
    return got


def test_every_module_of_one_invoke_equals_the_hooks(lm, hf):
    text = prompt(3, 5, 7, 9)
    with lm.trace(text) as tracer:
        cache = tracer.cache(include_inputs=True)
    with lm.trace(text) as tracer:
        outputs_only = tracer.cache()
    want, want_in = recorded(hf, text), recorded(hf, text, inputs=True)
    assert outputs_only.keys() == list(want)  # the order the modules returned in
    assert sorted(cache.keys()) == sorted(want)
    compared = 0
    for path, outs in want.items():
        assert len(cache[path].calls) == len(outs)
        if isinstance(outs[0], torch.Tensor):
            assert close(cache[path].output, outs[0]), path
            compared += 1
        if isinstance(want_in[path][0], torch.Tensor):
            assert close(cache[path].input, want_in[path][0]), path
    assert compared >= 20
    assert all_hooks(hf) == 0 and not torch.nn.modules.module._global_forward_hooks


def test_the_paths_and_attributes_all_reach_one_entry(lm, hf):
    text = prompt(4, 6)
    with lm.trace(text) as tracer:
        cache = tracer.cache()
    block = "transformer.h.1" if hasattr(hf, "transformer") else "model.layers.1"
    want = recorded(hf, text)[block][0]
    views = [cache[block], cache["model." + block], cache.model, block_envoys(lm)[1]]
    by_attr = block_envoys(cache.model)[1] if hasattr(hf, "transformer") else cache.model.model.layers[1]
    short = cache.transformer.h[1] if hasattr(hf, "transformer") else cache.model.layers[1]
    assert close(cache[block_envoys(lm)[1]._path].output, want)
    for view in [views[0], views[1], by_attr, short]:
        assert close(view.output, want)
    assert block in cache and "nothing.here" not in cache


def test_the_cache_records_after_the_edits(lm, hf):
    text = prompt(8, 9, 10)
    with lm.trace(text) as tracer:
        cache = tracer.cache(modules=[block_envoys(lm)[0], block_envoys(lm)[2]])
        block_envoys(lm)[0].output[:, -1] = 0
    p0, p2 = block_envoys(lm)[0]._path, block_envoys(lm)[2]._path

    def zero_last(o):
        o = o.clone()
        o[:, -1] = 0
        return o
    want = recorded(hf, text, edits={p0: zero_last})
    assert cache.keys() == [p0, p2]
    assert close(cache[p0].output, want[p0][0]) and close(cache[p2].output, want[p2][0])
    assert (cache[p0].output[:, -1] == 0).all()


def test_each_invoke_caches_its_own_rows(lm, hf):
    long, short = prompt(3, 4, 5, 6, 7), prompt(3, 4)  # a shared prefix: padding must not leak in
    with lm.trace() as tracer:
        with tracer.invoke(long):
            a = tracer.cache(modules=["lm_head"])
        with tracer.invoke(short):
            b = tracer.cache(modules=["lm_head"])
    assert close(a["lm_head"].output, recorded(hf, long)["lm_head"][0])
    assert close(b["lm_head"].output, recorded(hf, short)["lm_head"][0])


def test_a_module_called_twice_records_both_calls():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(torch.relu(self.inner(x)))

    torch.manual_seed(0)
    net = Twice()
    model = nnpatch.Model(net)
    x = torch.randn(2, 4)
    with model.trace(x) as tracer:
        cache = tracer.cache(modules=[model.inner], include_inputs=True)
    first = net.inner(x)
    second = net.inner(torch.relu(first))
    calls = cache["inner"].calls
    assert len(calls) == 2 and len(cache["inner"]) == 2
    assert close(calls[0].output, first) and close(calls[1].output, second)
    assert close(calls[1].input, torch.relu(first))
    assert [o.shape for o in cache["inner"].output] == [first.shape, second.shape]


def test_a_further_pass_records_each_call_once(lm, hf):
    # invoke 0 sets layer 0 from a value invoke 1 reads at layer 2: invoke 0 runs a further pass
    a_text, b_text = prompt(11, 12, 13), prompt(14, 15, 16)
    with lm.trace() as tracer:
        with tracer.invoke(a_text):
            cache = tracer.cache(modules=[block_envoys(lm)[0], block_envoys(lm)[2]])
            block_envoys(lm)[0].output[:] = late
        with tracer.invoke(b_text):
            late = block_envoys(lm)[2].output * 0.5
    b_late = recorded(hf, b_text)[block_envoys(lm)[2]._path][0] * 0.5
    p0, p2 = block_envoys(lm)[0]._path, block_envoys(lm)[2]._path
    want = recorded(hf, a_text, edits={p0: lambda o: b_late.clone()})
    assert len(cache[p0].calls) == 1 and len(cache[p2].calls) == 1
    assert close(cache[p0].output, b_late) and close(cache[p2].output, want[p2][0])


def test_device_dtype_and_detach(lm):
    with lm.trace(prompt(5, 6)) as tracer:
        cache = tracer.cache(modules=["lm_head"], dtype=torch.float64, device=None)
    out = cache["lm_head"].output
    assert out.dtype == torch.float64 and not out.requires_grad


def test_an_unknown_module_is_a_clear_error_and_nothing_is_left(lm, hf):
    bad = "transformer.h.1.atn" if hasattr(hf, "transformer") else "model.layers.1.self_atn"
    with pytest.raises(KeyError, match="did you mean") as info:
        with lm.trace(prompt(1, 2)) as tracer:
            tracer.cache(modules=[block_envoys(lm)[0], bad])
    assert bad in str(info.value)
    assert all_hooks(hf) == 0 and not any("forward" in m.__dict__ for m in hf.modules())
    assert not torch.nn.modules.module._global_forward_hooks


def test_a_cache_after_a_read_or_outside_an_invoke_is_an_error(lm, hf):
    with pytest.raises(nnpatch.NNPatchError, match="before invoke 0 reads"):
        with lm.trace(prompt(1, 2)) as tracer:
            block_envoys(lm)[0].output.sum()
            tracer.cache()
    with pytest.raises(nnpatch.NNPatchError, match="inside a `with tracer.invoke"):
        with lm.trace() as tracer:
            tracer.cache()
            with tracer.invoke(prompt(1, 2)):
                pass
    with pytest.raises(KeyError, match="not recorded"):
        with lm.trace(prompt(1, 2)) as tracer:
            cache = tracer.cache(modules=["lm_head"])
        cache[block_envoys(lm)[0]._path].output
    assert all_hooks(hf) == 0


def test_the_bundled_model_caches_every_block():
    model = nnpatch.models.load("ioi")
    text = "When Mary and John went to the store, John gave a drink to"
    with model.trace(text) as tracer:
        cache = tracer.cache(modules=[f"transformer.h.{i}" for i in range(len(model.transformer.h))])
    outs = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.detach().clone()))
               for i, b in enumerate(blocks(model.module))]
    try:
        with torch.no_grad():
            model.module(model.tokenizer(text, return_tensors="pt")["input_ids"])
    finally:
        for h in handles:
            h.remove()
    assert len(cache) == len(outs)
    for i, o in outs.items():
        assert close(cache[f"transformer.h.{i}"].output, o)


def test_steps_accumulate_and_a_replayed_pass_replaces_its_own_step(lm, hf):
    """What a generation driver does: one forward pass per step, `cache.step = k` before it."""
    class Pass:  # the two things Cache.attach uses of a forward pass
        def __init__(self):
            self.recorders = {}

        def record(self, event, recorder):
            self.recorders.setdefault(event, []).append(recorder)

        def view(self, inv, event):
            return self.values[event]

    with lm.trace(prompt(1, 2)) as tracer:
        cache = tracer.cache(modules=["lm_head"])
    first_step = cache["lm_head"].output
    passes = []
    for step, replays in [(1, 1), (2, 2)]:  # step 2 runs twice: a further pass replays it
        for attempt in range(replays):
            p = Pass()
            cache.step = step
            cache.attach(p, None)
            p.values = {("lm_head", "output"): torch.full((1, 1, 60), float(10 * step + attempt))}
            for recorder in p.recorders[("lm_head", "output")]:
                recorder(p, ("lm_head", "output"))
            passes.append(p)
    calls = cache["lm_head"].calls
    assert [c.step for c in calls] == [0, 1, 2]
    assert torch.equal(calls[0].output, first_step)
    assert calls[1].output.unique().tolist() == [10.0] and calls[2].output.unique().tolist() == [21.0]
