"""Random-weight models built from transformers configs (no downloads) and a word-level tokenizer."""
import pathlib
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 60
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def word_tokenizer():
    words = ["<pad>", "<bos>"] + [f"t{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<bos>", unk_token="<pad>")


def gpt2(n_layer=3, d=32, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=d, n_head=4, vocab_size=VOCAB, n_positions=64,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def llama(n_layer=3, d=32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=n_layer, hidden_size=d, intermediate_size=2 * d,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def prompt(*ids):
    return " ".join(f"t{i}" for i in ids)


def ids(text):
    return torch.tensor([[int(w[1:]) + 2 for w in text.split()]])


def blocks(hf):
    """The decoder blocks of a GPT-2 or Llama model, and the envoy path prefix."""
    if hasattr(hf, "transformer"):
        return hf.transformer.h
    return hf.model.layers


def hooked_forward(hf, text, module_hooks):
    """Logits of a plain forward with `(module, forward_hook)` pairs attached; the hand-written
    reference the engine's results are compared with."""
    handles = [module.register_forward_hook(hook) for module, hook in module_hooks]
    try:
        with torch.no_grad():
            return hf(ids(text)).logits
    finally:
        for h in handles:
            h.remove()


def block_envoys(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def all_hooks(module):
    """Every hook attached anywhere in a module tree (must be empty after a trace)."""
    n = 0
    for m in module.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    return n


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, which only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["gpt2", "llama"])
def arch(request):
    return request.param


@pytest.fixture
def hf(arch):
    return gpt2() if arch == "gpt2" else llama()


@pytest.fixture
def tok():
    return word_tokenizer()


@pytest.fixture
def lm(hf, tok):
    import nnpatch
    return nnpatch.LanguageModel(hf, tokenizer=tok)


sys.path.insert(0, str(pathlib.Path(__file__).parent))
