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
    elif how == "compiled":
        hf = torch.compile(hf)
    return hf


@pytest.fixture(params=["gpt2", "llama"])
def arch_name(request):
    return request.param


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "device_map", "compiled"])
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
