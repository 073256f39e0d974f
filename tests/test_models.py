"""The shipped demo models: loading through nnpatch and plain transformers, file sizes, and their
accuracy on held-out prompt pairs, scored with plain transformers forward passes."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM

import nnpatch
from nnpatch import tasks
from nnpatch.errors import NNPatchError

ARCH = {"ioi": GPT2LMHeadModel, "table-max": LlamaForCausalLM}


@pytest.fixture(scope="module")
def bundled():
    """Each bundled model and tokenizer, loaded with plain transformers."""
    out = {}
    for name in ARCH:
        folder = nnpatch.models.path(name)
        out[name] = (AutoModelForCausalLM.from_pretrained(folder).eval(),
                     AutoTokenizer.from_pretrained(folder))
    return out


@torch.no_grad()
def last_logits(model, tok, prompts):
    """Logits at each prompt's last token, prompts grouped by length so nothing is padded."""
    rows = [tok(p)["input_ids"] for p in prompts]
    out = torch.empty(len(prompts), model.config.vocab_size)
    for length in sorted({len(r) for r in rows}):
        members = [i for i, r in enumerate(rows) if len(r) == length]
        out[members] = model(input_ids=torch.tensor([rows[i] for i in members])).logits[:, -1]
    return out


def score(model, tok, prompts, right, other):
    logits = last_logits(model, tok, prompts)  # [n, vocab]
    right = torch.tensor([tok(a)["input_ids"][0] for a in right])
    other = torch.tensor([tok(a)["input_ids"][0] for a in other])
    n = torch.arange(len(prompts))
    accuracy = (logits.argmax(-1) == right).float().mean().item()
    return accuracy, (logits[n, right] - logits[n, other]).mean().item()


def test_available_lists_both_models_and_path_suggests_names():
    assert nnpatch.models.available() == ["ioi", "table-max"]
    with pytest.raises(NNPatchError, match="did you mean 'table-max'"):
        nnpatch.models.path("table_max")


@pytest.mark.parametrize("name", sorted(ARCH))
def test_folder_is_a_small_hugging_face_checkpoint(name, bundled):
    folder = nnpatch.models.path(name)
    for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / file).is_file()
    total = sum(f.stat().st_size for f in folder.iterdir())
    assert total <= 10 * 2**20, f"{name} takes {total / 2**20:.1f} MiB"
    model, tok = bundled[name]
    assert type(model) is ARCH[name]
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert len(tok) == model.config.vocab_size


def test_ioi_model_solves_held_out_pairs(bundled):
    model, tok = bundled["ioi"]
    pairs = tasks.ioi(300, seed=123)
    accuracy, logit_diff = score(model, tok, pairs.clean, pairs.answer, pairs.wrong)
    assert accuracy >= 0.99 and logit_diff >= 5, (accuracy, logit_diff)
    # The corruption flips the answer: on corrupt prompts the model names S.
    accuracy, logit_diff = score(model, tok, pairs.corrupt, pairs.wrong, pairs.answer)
    assert accuracy >= 0.99 and logit_diff >= 5, (accuracy, logit_diff)


def test_table_model_solves_held_out_pairs(bundled):
    model, tok = bundled["table-max"]
    pairs = tasks.table_max(300, seed=123)
    accuracy, _ = score(model, tok, pairs.clean, pairs.answer, pairs.wrong)
    assert accuracy >= 0.97, accuracy
    accuracy, _ = score(model, tok, pairs.corrupt, pairs.wrong, pairs.answer)
    assert accuracy >= 0.97, accuracy


@pytest.mark.parametrize("name", sorted(ARCH))
def test_left_padded_batch_matches_single_prompts(name, bundled):
    model, tok = bundled[name]
    if name == "ioi":
        prompts = tasks.ioi(6, seed=4).clean  # several templates, so several lengths
    else:
        prompts = tasks.table_max(3, seed=4, rows=3).clean + tasks.table_max(3, seed=5, rows=6).clean
    batch = tok(prompts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any(), "prompts of different lengths expected"
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(**batch, position_ids=positions).logits[:, -1]
    assert torch.allclose(padded, last_logits(model, tok, prompts), atol=1e-4)


def test_loading_through_nnpatch():
    model = nnpatch.models.load("ioi")
    assert isinstance(model, nnpatch.LanguageModel)
    assert model.to_tokens(" Mary") == model.tokenizer(" Mary")["input_ids"] and len(model.to_tokens(" Mary")) == 1
    assert type(nnpatch.LanguageModel("table-max").module) is LlamaForCausalLM


def test_unknown_hub_id_offline_names_local_paths_and_bundled_models():
    code = ("import nnpatch\n"
            "try:\n"
            "    nnpatch.LanguageModel('someone/not-a-real-model')\n"
            "except nnpatch.NNPatchError as e:\n"
            "    print(e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    message = done.stdout
    assert "someone/not-a-real-model" in message, done.stderr
    assert "local folder" in message and "ioi" in message and "table-max" in message
