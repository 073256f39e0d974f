"""What goes into a model: prompts as token ids, answer tokens, and the device inputs go to.

Each rule here has exactly one home, and traces, sweeps, magics and the workbench all call it:
how a prompt becomes token ids (`token_rows`), how one answer token is checked (`token_id`),
which argument of a module call is "its input" (`input_slot`), and where a model wants its
inputs (`input_device`).

    >>> import nnpatch
    >>> from nnpatch.engine.inputs import token_id
    >>> model = nnpatch.models.load("ioi")
    >>> token_id(model.tokenizer, " Mary", what="answer") == model.to_tokens(" Mary")[0]
    True
"""
from __future__ import annotations

import torch

from ..errors import NNPatchError


# -- prompts ----------------------------------------------------------------------------------------

def invoke_rows(tokenizer, value):
    """Like token_rows, but an unpadded id tensor stays a tensor (no round trip through lists)."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.long and value.dim() in (1, 2):
        return value.reshape(-1, value.shape[-1])
    return token_rows(tokenizer, value)


def token_rows(tokenizer, value) -> list[list[int]]:
    """The token ids of every prompt in one invoke's input, without padding."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        if tokenizer is None:
            raise NNPatchError(
                "string prompts need a tokenizer: pass tokenizer= to LanguageModel, or give token ids")
        return [list(tokenizer(v)["input_ids"]) for v in value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return [list(value)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        return [list(v) for v in value]
    mask = None
    if hasattr(value, "keys") and "input_ids" in value:  # tokenizer output or dict
        mask = value.get("attention_mask")
        value = value["input_ids"]
    if isinstance(value, torch.Tensor):
        ids = value if value.dim() == 2 else value.reshape(1, -1)
        if mask is None:
            return [row.tolist() for row in ids]
        mask = torch.as_tensor(mask).reshape(ids.shape).bool()
        return [row[m].tolist() for row, m in zip(ids, mask)]
    raise NNPatchError(
        f"cannot read a prompt from {type(value).__name__}: give a string, a list of strings, "
        "token ids (list or tensor), or a tokenizer output")


# -- answer tokens ----------------------------------------------------------------------------------

def token_id(tokenizer, value, *, what: str = "token", where: str = "", vocab_size: int | None = None) -> int:
    """The id of one token given as a string (" Mary") or an id; an error names `what` it was
    (e.g. "answer") and `where` (e.g. " (pair 3)") when it is not exactly one known token."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if vocab_size and not 0 <= value < vocab_size:
            raise NNPatchError(f"{what} token id {value}{where} is outside the vocabulary of "
                               f"{vocab_size} tokens")
        return value
    if not isinstance(value, str):
        raise NNPatchError(f"{what}{where} must be a token string or id, got {type(value).__name__}")
    if tokenizer is None:
        raise NNPatchError(f"{what} {value!r} is a string but the model has no tokenizer; give its token id")
    ids = tokenizer(value, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 1 and unk is not None and ids[0] == unk and value.strip() != tokenizer.unk_token:
        raise NNPatchError(f"{what} {value!r}{where} is not in the model's vocabulary; it must be "
                           "exactly one token (many tokenizers keep a word's leading space, e.g. ' Mary')")
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise NNPatchError(
            f"{what} {value!r}{where} is {len(ids)} tokens under this tokenizer ({pieces}); the "
            "metric compares single next-token logits, so give one token (often with a leading "
            "space, e.g. ' Mary') or its id")
    return ids[0]


def token_ids(tokenizer, value, n: int, *, what: str, unit: str | None = None,
              vocab_size: int | None = None) -> list[int]:
    """`n` token ids from one token for all `n` prompts, or one token per prompt. With `unit`
    (e.g. "pair"), errors say which one was wrong ("answer 'x' (pair 3) is 2 tokens")."""
    many = isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() > 0)
    values = list(value) if many else [value] * n
    if len(values) == 1:
        values = values * n
    units = f"{unit or 'prompt'}s"
    if len(values) != n:
        raise NNPatchError(f"{len(values)} {what} tokens for {n} {units}; give one {what} for all "
                           f"{units} or one per {unit or 'prompt'}")

    def where(i: int) -> str:
        if unit is None:
            return ""
        return f" ({unit} {i})" if many else f" (for all {units})"
    return [token_id(tokenizer, v, what=what, where=where(i), vocab_size=vocab_size)
            for i, v in enumerate(values)]


# -- module calls -----------------------------------------------------------------------------------

def input_slot(args: tuple, kwargs: dict, index: int = 0):
    """Which argument of a module call is its input number `index`: a position in `args`, or,
    for a module called by keyword, the keyword (`hidden_states` when present, else the first
    tensor keyword). None when the call has no such input."""
    if len(args) > index:
        return index
    if "hidden_states" in kwargs:
        return "hidden_states"
    return next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)


def read_input(args: tuple, kwargs: dict, slot):
    return args[slot] if isinstance(slot, int) else kwargs[slot]


def with_input(args: tuple, kwargs: dict, slot, value) -> tuple[tuple, dict]:
    """(args, kwargs) with the input at `slot` replaced by `value`."""
    if isinstance(slot, int):
        return args[:slot] + (value,) + args[slot + 1:], kwargs
    return args, {**kwargs, slot: value}


# -- devices ----------------------------------------------------------------------------------------

def input_device(module: torch.nn.Module) -> torch.device:
    """Where a model wants its inputs: its input embedding's device, else its first parameter's
    (so a model moved to CUDA takes prompts tokenized on the CPU)."""
    try:
        return module.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        pass
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
