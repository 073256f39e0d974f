"""Models placed by accelerate (device maps over cpu and disk, cpu_offload, disk_offload) and
torch.compile'd models trace, patch and sweep with the values of the plain model."""
import pytest
import torch

import nnpatch
from conftest import all_hooks, block_envoys, gpt2, llama, prompt, word_tokenizer

accelerate = pytest.importorskip("accelerate")

A = prompt(1, 2, 3, 4, 5, 6)
B = prompt(1, 2, 9, 4, 5, 6)
BUILD = {"gpt2": gpt2, "llama": llama}


def first(o):
    return o[0] if isinstance(o, tuple) else o


def ids(text):
    return torch.tensor([[int(w[1:]) + 2 for w in text.split()]])


def device_map(hf, on_disk):
    """Every top-level piece on "cpu", the blocks in `on_disk` on "disk"."""
    blocks = "transformer.h" if hasattr(hf, "transformer") else "model.layers"
    base = blocks.split(".")[0]
    entries = {}
    for name, _ in getattr(hf, base).named_children():
        if f"{base}.{name}" == blocks:
            for i in range(len(hf.get_submodule(blocks))):
                entries[f"{blocks}.{i}"] = "disk" if i in on_disk else "cpu"
        else:
            entries[f"{base}.{name}"] = "cpu"
    entries["lm_head"] = "cpu"
    return entries


def placed(arch, how, tmp_path):
    hf = BUILD[arch]()
    if how == "cpu_offload":
        accelerate.cpu_offload(hf, execution_device="cpu")
    elif how == "disk_offload":
        accelerate.disk_offload(hf, offload_dir=str(tmp_path / "offload"), execution_device="cpu")
    elif how == "device_map":
        accelerate.dispatch_model(hf, device_map=device_map(hf, on_disk={1}),
                                  offload_dir=str(tmp_path / "offload"))
    elif how == "embedding_on_disk":  # the first module's weights on disk: inputs go where it runs
        entries = device_map(hf, on_disk={0})
        entries[next(k for k in entries if k.endswith(("wte", "embed_tokens")))] = "disk"
        entries["lm_head"] = "disk"  # GPT-2 ties it to the embedding
        accelerate.dispatch_model(hf, device_map=entries, offload_dir=str(tmp_path / "offload"))
        assert hf.get_input_embeddings().weight.is_meta
    elif how == "compiled":
        hf = torch.compile(hf)
    return hf


@pytest.fixture(params=["gpt2", "llama"])
def arch_name(request):
    return request.param


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "device_map", "embedding_on_disk", "compiled"])
def test_traces_read_and_patch_like_the_plain_model(arch_name, how, tmp_path):
    plain = nnpatch.LanguageModel(BUILD[arch_name](), tokenizer=word_tokenizer())
    model = nnpatch.LanguageModel(placed(arch_name, how, tmp_path), tokenizer=word_tokenizer())

    def program(lm):
        layers = block_envoys(lm)
        with torch.no_grad():
            with lm.trace() as tracer:
                with tracer.invoke(A):
                    clean = first(layers[1].output)[:, -1]
                    h2 = first(layers[2].output).clone().save()
                with tracer.invoke(B):
                    first(layers[1].output)[:, -1] = clean
                    patched = lm.output.logits.save()
        return h2, patched

    for got, want in zip(program(model), program(plain)):
        assert got.device.type == "cpu" and torch.allclose(got, want, atol=1e-5)
    assert all_hooks(model.module) == 0  # accelerate wraps forward methods; it adds no torch hooks


@pytest.mark.parametrize("how", ["cpu_offload", "device_map"])
def test_sweeps_like_the_plain_model(arch_name, how, tmp_path):
    plain = nnpatch.LanguageModel(BUILD[arch_name](), tokenizer=word_tokenizer())
    model = nnpatch.LanguageModel(placed(arch_name, how, tmp_path), tokenizer=word_tokenizer())
    options = dict(answer="t5", wrong="t6", site="resid_pre", by=("layer", "pos"), progress=False)
    got = nnpatch.activation_patching(model, A, B, **options)
    want = nnpatch.activation_patching(plain, A, B, **options)
    assert torch.allclose(got.values, want.values, atol=1e-5)


def test_compiled_model_exposes_the_module_tree(arch_name):
    compiled = torch.compile(BUILD[arch_name]())
    model = nnpatch.LanguageModel(compiled, tokenizer=word_tokenizer())
    assert "_orig_mod" not in dir(model)
    block_envoys(model)[2]  # no `_orig_mod` in the path
    assert [s.path for s in nnpatch.sites(model)["resid_pre"]][0].split(".")[0] in ("transformer", "model")


# -- every entry point on dispatched models (issue 15, item 1) -------------------------------------
# "device_map" above puts every block on "cpu" except block 1 on "disk" (an offload folder in a
# temporary directory); "cpu_offload" keeps every weight on the meta device until its module runs.

PAIRS = [(prompt(1, 2, 3, 4, 5), prompt(1, 7, 3, 4, 5)), (prompt(2, 8, 3, 1, 6), prompt(2, 8, 9, 1, 6)),
         (prompt(4, 4, 4, 4, 4), prompt(4, 4, 4, 4, 4)), (prompt(1, 2, 3, 4, 5), prompt(1, 7, 3, 4, 5))]
ANSWERS, WRONGS = ["t5", "t6", "t7", "t5"], ["t6", "t5", "t8", "t6"]  # two equal pairs, one no-op pair
RESID = {"gpt2": {"resid_pre": "transformer.h.{i}.input"}, "llama": {"resid_pre": "model.layers.{i}.input"}}


@pytest.mark.parametrize("how", ["cpu_offload", "device_map", "embedding_on_disk"])
def test_sweeps_of_many_pairs_equal_plain_hooks(arch_name, how, tmp_path):
    from conftest import patching_reference, site_places, sweep_cells
    model = nnpatch.LanguageModel(placed(arch_name, how, tmp_path), tokenizer=word_tokenizer())
    clean, corrupt = [c for c, _ in PAIRS], [k for _, k in PAIRS]
    got = nnpatch.activation_patching(model, clean, corrupt, answer=ANSWERS, wrong=WRONGS, site="resid_pre",
                                      by=("layer", "pos"), progress=False, batch_size=3)
    plain = BUILD[arch_name]()
    tok = lambda ps: [ids(p)[0].tolist() for p in ps]  # noqa: E731
    ref = patching_reference(plain, site_places(plain, RESID[arch_name]), tok(clean), tok(corrupt),
                             sweep_cells(("layer", "pos"), {"layer": 3, "pos": 5}), site="resid_pre",
                             answer=[int(ids(a)[0, 0]) for a in ANSWERS], wrong=[int(ids(w)[0, 0]) for w in WRONGS])
    assert got.values.device.type == "cpu"
    assert torch.allclose(got.values.double().flatten(), ref.values, atol=1e-5)
    assert all_hooks(model.module) == 0


@pytest.mark.parametrize("how", ["cpu_offload", "device_map"])
@pytest.mark.parametrize("site,by", [("resid_pre", ("layer", "pos")), ("head_out", ("layer", "head"))])
def test_attribution_patching_and_patch_cells_like_the_plain_model(arch_name, how, site, by, tmp_path):
    plain = nnpatch.LanguageModel(BUILD[arch_name](), tokenizer=word_tokenizer())
    model = nnpatch.LanguageModel(placed(arch_name, how, tmp_path), tokenizer=word_tokenizer())
    clean, corrupt = [c for c, _ in PAIRS[:2]], [k for _, k in PAIRS[:2]]
    options = dict(answer=ANSWERS[:2], wrong=WRONGS[:2], site=site, by=by)
    got = nnpatch.attribution_patching(model, clean, corrupt, progress=False, **options)
    want = nnpatch.attribution_patching(plain, clean, corrupt, progress=False, **options)
    assert got.values.device.type == "cpu" and torch.allclose(got.values, want.values, atol=1e-5)
    from nnpatch.sweep import patch_cells
    cells = [(1, 1), (2, 0)]
    got, want = patch_cells(model, clean, corrupt, cells, **options), patch_cells(plain, clean, corrupt, cells, **options)
    assert got.patched_logits.device.type == "cpu"
    assert torch.allclose(got.patched_logits, want.patched_logits, atol=1e-5)
    assert all_hooks(model.module) == 0


@pytest.mark.parametrize("how", ["cpu_offload", "device_map"])
def test_trace_gradients_equal_autograd_on_the_plain_model(arch_name, how, tmp_path):
    plain = BUILD[arch_name]()
    model = nnpatch.LanguageModel(placed(arch_name, how, tmp_path), tokenizer=word_tokenizer())
    layers = block_envoys(model)
    with model.trace(A):
        h1 = first(layers[1].output)
        logits = model.output.logits
        loss = logits[0, -1, 5] - logits[0, -1, 6]
        with loss.backward():
            g = h1.grad.save()
    # torch.autograd on the plain model's weights
    kept = {}
    handle = (plain.transformer.h if arch_name == "gpt2" else plain.model.layers)[1].register_forward_hook(
        lambda m, a, o: kept.setdefault("h", first(o)))
    try:
        out = plain(ids(A)).logits
    finally:
        handle.remove()
    want, = torch.autograd.grad(out[0, -1, 5] - out[0, -1, 6], kept["h"])
    assert g.device.type == "cpu" and torch.allclose(g, want, atol=1e-5)
    assert all_hooks(model.module) == 0


@pytest.mark.parametrize("how", ["cpu_offload", "device_map"])
def test_magic_and_workbench_on_a_dispatched_model(how, tmp_path):
    pytest.importorskip("IPython")
    from IPython.testing.globalipapp import get_ipython
    from IPython.utils.capture import capture_output
    from nnpatch.jupyter.controller import Settings, WorkbenchController
    plain = nnpatch.LanguageModel(gpt2(), tokenizer=word_tokenizer())
    model = nnpatch.LanguageModel(placed("gpt2", how, tmp_path), tokenizer=word_tokenizer())
    want = nnpatch.activation_patching(plain, A, B, answer="t5", wrong="t6", site="mlp_out", progress=False)

    settings = Settings(A, B, "t5", "t6", site="mlp_out", by=("layer", "pos"))
    assert torch.allclose(WorkbenchController(model).run(settings).values, want.values, atol=1e-5)

    import plotly.io as pio
    ip = get_ipython()
    ip.run_line_magic("load_ext", "nnpatch")
    ip.user_ns.update(dispatched=model, a=A, b=B)
    renderer, pio.renderers.default = pio.renderers.default, "plotly_mimetype"
    try:
        with capture_output():
            res = ip.run_cell("%patch_sweep dispatched --clean a --corrupt b --answer 't5' --wrong 't6' "
                              "--site mlp_out --out swept")
    finally:
        pio.renderers.default = renderer
    assert res.error_in_exec is None
    assert torch.allclose(ip.user_ns["swept"].values, want.values, atol=1e-5)


# Half precision: the dispatched model computes what the same half-precision model computes
# undispatched (same kernels, same order: 1e-3 on the normalised grid). Against float32, the raw
# logit differences (about 0.05 on these random models) move by less than HALF_TOL; the normalised
# grid is no fair comparison here, as clean and corrupt differ by only ~0.005 logits.
HALF_TOL = {torch.float16: 1e-3, torch.bfloat16: 5e-3}  # measured: 4e-4 and 1.5e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dispatched_sweeps(arch_name, dtype, tmp_path):
    fp32 = nnpatch.LanguageModel(BUILD[arch_name](), tokenizer=word_tokenizer())
    half = nnpatch.LanguageModel(BUILD[arch_name]().to(dtype), tokenizer=word_tokenizer())
    hf = BUILD[arch_name]().to(dtype)
    accelerate.dispatch_model(hf, device_map=device_map(hf, on_disk={1}), offload_dir=str(tmp_path / "off"))
    model = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    options = dict(answer="t5", wrong="t6", site="resid_pre", by=("layer", "pos"), progress=False)
    got = nnpatch.activation_patching(model, A, B, **options)
    assert got.values.device.type == "cpu" and got.values.dtype == torch.float32
    assert torch.allclose(got.values, nnpatch.activation_patching(half, A, B, **options).values, atol=1e-3)
    raw = {**options, "metric": "logit_diff_raw"}
    got, want = nnpatch.activation_patching(model, A, B, **raw), nnpatch.activation_patching(fp32, A, B, **raw)
    assert (got.values - want.values).abs().max() < HALF_TOL[dtype]


def test_a_module_left_on_meta_is_a_clear_error_and_the_model_is_unchanged(arch_name):
    hf = BUILD[arch_name]()
    blocks = "transformer.h" if arch_name == "gpt2" else "model.layers"
    hf.get_submodule(f"{blocks}.1").to("meta")
    model = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    before = {n: (p.device, p.shape) for n, p in hf.named_parameters()}
    with pytest.raises(nnpatch.NNPatchError, match=rf"module {blocks}\.1\.\S+ .*'meta'.*device_map"):
        nnpatch.activation_patching(model, A, B, answer="t5", wrong="t6", progress=False)
    with pytest.raises(nnpatch.NNPatchError, match=r"'meta' device .* offload_folder"):
        with model.trace(A):
            model.output.save()
    assert all_hooks(hf) == 0 and {n: (p.device, p.shape) for n, p in hf.named_parameters()} == before


@pytest.mark.parametrize("how", ["cpu_offload", "device_map", "embedding_on_disk"])
def test_generation_with_steering_like_the_plain_model(arch_name, how, tmp_path):
    """A steered, batched generation on a placed model generates the plain model's tokens and
    reads the same per-step hidden states."""
    plain = nnpatch.LanguageModel(BUILD[arch_name](), tokenizer=word_tokenizer())
    model = nnpatch.LanguageModel(placed(arch_name, how, tmp_path), tokenizer=word_tokenizer())
    steer = torch.linspace(-2, 2, plain.module.config.hidden_size)

    def program(lm):
        layers = block_envoys(lm)
        with torch.no_grad():
            with lm.generate(max_new_tokens=3, do_sample=False, min_new_tokens=3) as tracer:
                with tracer.invoke(A):
                    states = []
                    for step in tracer.all():
                        first(layers[1].output)[:, -1] += steer
                        states.append(first(layers[2].output)[:, -1].clone().save())
                    out = lm.generator.output.save()
                with tracer.invoke(prompt(7, 8)):
                    short = lm.generator.output.save()
        return states, out, short

    want, got = program(plain), program(model)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got[0], want[0])) and len(got[0]) == 3
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert all(t.device.type == "cpu" for t in got[0])
    assert all_hooks(model.module) == 0


def test_input_device_follows_an_embedding_replaced_or_hooked_after_the_first_trace(arch_name):
    """`input_device` remembers where the embedding sits, not which module it is, and reads
    accelerate's hook every time: a replaced embedding and a hook added later are both seen."""
    from nnpatch.engine.devices import input_device, input_embedding

    hf = BUILD[arch_name]()
    model = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    with model.trace(A):
        h = model.output
    assert input_embedding(hf) is hf.get_input_embeddings()
    hf.resize_token_embeddings(hf.config.vocab_size + 8)
    assert input_embedding(hf) is hf.get_input_embeddings()
    replacement = torch.nn.Embedding(hf.config.vocab_size, hf.config.hidden_size)
    hf.set_input_embeddings(replacement)
    assert input_embedding(hf) is replacement

    class Hook:  # what accelerate's hooks expose
        execution_device = "meta"

    replacement._hf_hook = Hook()
    assert input_device(hf) == torch.device("meta")
    del replacement._hf_hook
    assert input_device(hf) == torch.device("cpu")
    with model.trace(A):
        after = model.output.logits
    torch.testing.assert_close(after, hf(torch.tensor([model.to_tokens(A)])).logits, rtol=0, atol=0)
    assert all_hooks(hf) == 0


def test_input_device_of_a_model_without_an_input_embedding():
    from nnpatch.engine.devices import input_device, input_embedding

    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert input_embedding(net) is None and input_device(net) == torch.device("cpu")
    net.to("meta")
    assert input_device(net) == torch.device("cpu")  # nothing to run on: the CPU, as before
