"""The wrapper's torch-style methods (`.to`, `.half`, `.eval`, ...) and the error classes.

Each method must act on the wrapped module (checked against the same method called on a copy of
the plain module) and return the wrapper, as nnsight's do; each error class must be caught both
by `except nnpatch.NNPatchError` and by the builtin a Python user would write.
"""
import copy
import pickle

import pytest
import torch

import nnpatch
from conftest import all_hooks, gpt2, ids, prompt, word_tokenizer
from nnpatch.errors import (NNPatchAttributeError, NNPatchError, NNPatchIndexError, NNPatchKeyError,
                            NNPatchTypeError, NNPatchValueError)

A = prompt(3, 5, 7, 9)


def params(module):
    return {name: p for name, p in module.named_parameters()}


def same_weights(a, b):
    pa, pb = params(a), params(b)
    return pa.keys() == pb.keys() and all(pa[k].dtype == pb[k].dtype and torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("method, dtype", [("half", torch.float16), ("bfloat16", torch.bfloat16),
                                           ("double", torch.float64), ("float", torch.float32)])
def test_dtype_methods_cast_the_module_and_return_the_wrapper(method, dtype):
    hf = gpt2()
    reference = getattr(copy.deepcopy(hf), method)()
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    assert getattr(lm, method)() is lm
    assert same_weights(hf, reference)
    assert lm.dtype == dtype and lm.module is hf


def test_to_moves_and_casts_the_module_and_traces_run_after():
    hf = gpt2()
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    assert lm.to(torch.float64) is lm and lm.dtype == torch.float64
    assert lm.to("cpu") is lm and lm.to(device="cpu", dtype=torch.float64) is lm
    assert lm.cpu() is lm and lm.device == torch.device("cpu")
    reference = gpt2().double()                     # the same weights (same seed), cast
    assert same_weights(hf, reference)
    with lm.to(torch.float64).eval().trace(A):
        hidden = lm.transformer.h[1].output
        logits = lm.output.logits
    with torch.no_grad():
        ref = reference(ids(A))
    assert logits.dtype == torch.float64 and torch.equal(logits, ref.logits)
    assert hidden.dtype == torch.float64
    assert all_hooks(hf) == 0


def test_cuda_is_forwarded_to_the_module(monkeypatch):
    hf = gpt2()
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    calls = []
    monkeypatch.setattr(hf, "cuda", lambda device=None: calls.append(device) or hf)
    assert lm.cuda() is lm and lm.cuda(1) is lm
    assert calls == [None, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_moves_the_module_and_prompts_follow():
    hf = gpt2()
    with torch.no_grad():
        ref = hf(ids(A)).logits
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    assert lm.cuda() is lm and lm.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in hf.parameters())
    with lm.trace() as tracer:
        with tracer.invoke(A):
            logits = lm.output.logits
        with tracer.invoke(prompt(3, 5)):
            pass
    assert logits.device.type == "cuda" and torch.allclose(logits.cpu(), ref, atol=1e-4)
    assert lm.cpu() is lm and lm.device.type == "cpu"


def test_train_and_eval_set_the_mode_of_every_submodule_and_return_the_wrapper():
    hf = gpt2()
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    assert lm.train() is lm and all(m.training for m in hf.modules())
    assert lm.eval() is lm and not any(m.training for m in hf.modules())
    assert lm.train(True).train(False) is lm and not any(m.training for m in hf.modules())
    hf.config.attn_pdrop = hf.config.resid_pdrop = hf.config.embd_pdrop = 0.5
    for m in hf.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    lm.train()
    torch.manual_seed(0)
    with lm.trace(A):
        train_logits = lm.output.logits
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(train_logits, hf(ids(A)).logits)      # dropout active, same draws
    lm.eval()
    with lm.trace(A):
        eval_logits = lm.output.logits
    with torch.no_grad():
        assert torch.equal(eval_logits, hf(ids(A)).logits) and not torch.equal(eval_logits, train_logits)


def test_requires_grad_sets_every_parameter_and_returns_the_wrapper():
    hf = gpt2()
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    assert lm.requires_grad_(False) is lm and not any(p.requires_grad for p in hf.parameters())
    assert lm.requires_grad_() is lm and all(p.requires_grad for p in hf.parameters())


def test_device_and_dtype_of_plain_modules():
    net = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()))
    assert net.device == torch.device("cpu") and net.dtype == torch.float32
    assert net.double() is net and net.dtype == torch.float64 and net.module[0].weight.dtype == torch.float64
    empty = nnpatch.Model(torch.nn.ReLU())
    assert empty.device == torch.device("cpu") and empty.dtype == torch.get_default_dtype()
    with net.trace(torch.ones(2, 3, dtype=torch.float64)):
        out = net[0].output
    assert torch.equal(out, net.module[0](torch.ones(2, 3, dtype=torch.float64)))


# -- error classes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, builtin", [(NNPatchValueError, ValueError), (NNPatchTypeError, TypeError),
                                          (NNPatchIndexError, IndexError), (NNPatchAttributeError, AttributeError),
                                          (NNPatchKeyError, KeyError)])
def test_error_classes_are_nnpatch_errors_and_builtins(cls, builtin):
    e = cls("layer 9 is out of range; the model has 3 layers")
    assert isinstance(e, NNPatchError) and isinstance(e, builtin) and nnpatch.NNPatchError is NNPatchError
    assert str(e) == "layer 9 is out of range; the model has 3 layers"        # not quoted, even KeyError
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e)
    with pytest.raises(builtin):
        raise e
    assert not issubclass(NNPatchError, (ValueError, TypeError, IndexError, AttributeError, KeyError))


def test_errors_are_caught_by_the_builtin_a_user_expects(lm, hf):
    with pytest.raises(ValueError, match="65 tokens"):                        # too long a prompt
        with lm.trace(list(range(2, 60)) + [2] * 7):
            out = lm.output
    with pytest.raises(ValueError, match="token id 99"):                       # outside the vocabulary
        with lm.trace([3, 99]):
            out = lm.output
    with pytest.raises(TypeError, match="float32"):                            # float ids
        with lm.trace(torch.tensor([[3.0, 4.0]])):
            out = lm.output
    with pytest.raises(TypeError, match="foo"):                                # an unknown keyword
        with lm.trace(A, foo=1):
            out = lm.output  # noqa: F841
    with pytest.raises(AttributeError, match="no module 'transformer.hh'"):   # a module path
        nnpatch.engine.hooks.resolve(hf, "transformer.hh")
    with pytest.raises(IndexError, match="template"):
        nnpatch.tasks.ioi(2, template=99)
    with pytest.raises(ValueError, match="metric 'logit_dif'"):
        from nnpatch.patching.metrics import get
        get("logit_dif")
    assert all_hooks(hf) == 0


def test_sweep_input_errors_keep_their_class():
    model = nnpatch.models.load("ioi")
    with pytest.raises(ValueError, match="clean prompt 0.*'Zyzzyva'"):
        nnpatch.activation_patching(model, "When Zyzzyva and John went", "When Mary and John went",
                                    answer=" Mary", wrong=" John", site="resid_pre", by=("layer",),
                                    progress=False)
    with pytest.raises(IndexError, match="layer 9"):
        nnpatch.activation_patching(model, nnpatch.tasks.ioi(2), site="resid_pre", by=("layer",), layers=[9],
                                    progress=False)


def test_iterating_a_module_list_gives_the_same_envoys_every_time():
    """Envoys are cached per child: the second iteration must return the cached ones (a block
    has no len(), so a cached envoy must never be tested for truth)."""
    model = nnpatch.LanguageModel(gpt2(), tokenizer=word_tokenizer())
    first = list(model.transformer.h)
    again = list(model.transformer.h)
    assert [e._path for e in first] == [f"transformer.h.{i}" for i in range(len(first))]
    assert all(a is b for a, b in zip(first, again)) and len(again) == len(first)
