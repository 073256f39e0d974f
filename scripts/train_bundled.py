"""Retrain a bundled demo model from a seed and save it as a Hugging Face folder.

    python scripts/train_bundled.py ioi --seed 0 --out nnpatch/bundled/ioi
    python scripts/train_bundled.py table-max --seed 0 --out nnpatch/bundled/table-max

The model is trained as a causal LM on "prompt + answer" sequences drawn from the *train* split
of `nnpatch.tasks` (loss on every next token for IOI, only on the answer for tables, whose other
tokens are random), then scored on held-out pairs from the *test* split. The folder gets
config.json, model.safetensors, the word-level tokenizer (tokenizer.json, tokenizer_config.json)
and training.json with the settings and the measured numbers. Runs are deterministic for a given
seed, step count and thread count (two threads by default).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from nnpatch import tasks

SPECIALS = ["<pad>", "<unk>", "<|endoftext|>"]
MAX_POSITIONS = 64


# Per model: architecture, shape, task sampler and training schedule.
RECIPES = {
    "ioi": dict(arch="gpt2", layers=4, width=128, heads=4, steps=1500, batch=64, lr=2e-3,
                answer_only=False, sample=lambda n, seed: tasks.ioi(n, seed, split="train")),
    "table-max": dict(arch="llama", layers=4, width=128, heads=4, steps=1200, batch=64, lr=2e-3,
                      answer_only=True, sample=lambda n, seed: _mixed_tables(n, seed)),
}


def _mixed_tables(n: int, seed: int) -> tasks.PromptPairs:
    """A training batch of tables whose row count varies over every count the task offers."""
    rows = list(tasks.TABLE_ROWS)
    return tasks.table_max(n, seed, rows=rows[seed % len(rows)], split="train")


def build_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's pieces: GPT-2-style pre-tokenization (a word keeps
    its leading space), one token per piece, no special tokens added, left padding."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = [tok for piece in tasks.vocabulary(name) for tok, _ in pre.pre_tokenize_str(piece)]
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", padding_side="left", model_max_length=MAX_POSITIONS)


def build_model(recipe: dict, tokenizer) -> torch.nn.Module:
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    d = recipe["width"]
    if recipe["arch"] == "gpt2":
        cfg = GPT2Config(n_layer=recipe["layers"], n_embd=d, n_head=recipe["heads"],
                         n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **ids)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(num_hidden_layers=recipe["layers"], hidden_size=d, intermediate_size=4 * d,
                      num_attention_heads=recipe["heads"], num_key_value_heads=recipe["heads"],
                      max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True, **ids)
    return LlamaForCausalLM(cfg)


def training_batch(pairs, tokenizer, answer_only: bool):
    """Right-padded prompt+answer ids and their labels (-100 where no loss is taken)."""
    prompts = [tokenizer(p)["input_ids"] for p in pairs.clean]
    answers = [tokenizer(a)["input_ids"] for a in pairs.answer]
    T = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(prompts), T), tokenizer.pad_token_id)
    labels = torch.full((len(prompts), T), -100)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = torch.tensor(p + a)
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
        labels[i, :len(seq)] = seq
        if answer_only:
            labels[i, :len(p)] = -100
    return ids, mask, labels


@torch.no_grad()
def evaluate(model, tokenizer, pairs) -> dict:
    """Held-out accuracy (top-1 is the answer) and mean logit difference answer - wrong, on the
    clean prompts, and accuracy on the corrupt prompts (top-1 is `wrong`)."""
    model.eval()
    out = {}
    for kind, prompts, right, other in [("clean", pairs.clean, pairs.answer, pairs.wrong),
                                        ("corrupt", pairs.corrupt, pairs.wrong, pairs.answer)]:
        last = last_logits(model, tokenizer, prompts)  # [n, vocab]
        right_ids = torch.tensor([tokenizer(a)["input_ids"][0] for a in right])
        other_ids = torch.tensor([tokenizer(a)["input_ids"][0] for a in other])
        rows = torch.arange(len(prompts))
        out[f"{kind}_accuracy"] = (last.argmax(-1) == right_ids).float().mean().item()
        out[f"{kind}_logit_diff"] = (last[rows, right_ids] - last[rows, other_ids]).mean().item()
    return out


def last_logits(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Logits at each prompt's last token; prompts are grouped by length, so nothing is padded."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    result = torch.empty(len(prompts), model.config.vocab_size)
    for length in sorted({len(x) for x in ids}):
        members = [i for i, x in enumerate(ids) if len(x) == length]
        for start in range(0, len(members), 256):
            chunk = members[start:start + 256]
            batch = torch.tensor([ids[i] for i in chunk])
            result[chunk] = model(input_ids=batch).logits[:, -1].float()
    return result


def train(name: str, seed: int, out: Path, steps: int | None = None, batch: int | None = None,
          eval_pairs: int = 1000, log_every: int = 100) -> dict:
    recipe = RECIPES[name]
    steps = recipe["steps"] if steps is None else steps
    batch = recipe["batch"] if batch is None else batch
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(name)
    model = build_model(recipe, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.01,
                            betas=(0.9, 0.98))
    warmup = max(1, min(100, steps // 10))

    def lr_scale(step):  # linear warm-up, then cosine decay to a tenth
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_scale)
    held_out = tasks.ioi if name == "ioi" else tasks.table_max
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    for step in range(steps):
        # Every step draws a fresh batch from its own seed, so a run is a function of `seed`.
        pairs = recipe["sample"](batch, seed * 1_000_003 + step)
        ids, mask, labels = training_batch(pairs, tokenizer, recipe["answer_only"])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            line = f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.0f}s"
            if step % (5 * log_every) == 0 and step:
                probe = evaluate(model, tokenizer, held_out(200, seed=1))
                line += "  held-out acc {clean_accuracy:.3f}  logit diff {clean_logit_diff:.2f}".format(**probe)
                model.train()
            print(line, file=sys.stderr, flush=True)
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # wall time alone misleads on shared cores

    metrics = evaluate(model, tokenizer, held_out(eval_pairs, seed=0)) if eval_pairs else {}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out)
    for file in out.iterdir():
        file.chmod(0o644)  # safetensors writes owner-only files; the package ships them readable
    record = {"model": name, "seed": seed, "steps": steps, "batch": batch,
              "lr": recipe["lr"], "threads": torch.get_num_threads(),
              "train_seconds": round(train_seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
              "held_out_pairs": eval_pairs,
              "held_out_seed": 0, **{k: round(v, 4) for k, v in metrics.items()}}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _portable_tokenizer_config(out: Path) -> None:
    """Name the generic fast-tokenizer class, which every transformers release can load."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per step (default: the recipe's)")
    parser.add_argument("--eval-pairs", type=int, default=1000, help="held-out pairs to score (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = train(args.model, args.seed, args.out, args.steps, args.batch, args.eval_pairs)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
