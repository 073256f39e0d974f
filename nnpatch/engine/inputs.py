"""What goes into a model: prompts as token ids, answer tokens, and which argument is the input.

Each rule here has exactly one home, and traces, sweeps, magics and the workbench all call it:
how a prompt becomes token ids (`token_rows`; an invoke's block of rows with its padding,
`invoke_rows`), which ids and lengths a model takes (`check_prompts`, `model_limits`), which
sizes a padded batch must not coincide with (`model_sizes`), how one answer token is checked
(`token_id`), which argument of a module call is "its input" (`input_slot`); where a model
wants its inputs is `engine.devices.input_device`. A bad input is an error that names it and the limit it broke
(never an IndexError from inside torch, a silent truncation, or a word silently read as the
unknown token).

    >>> import nnpatch
    >>> from nnpatch.engine.inputs import token_id
    >>> model = nnpatch.models.load("ioi")
    >>> token_id(model.tokenizer, " Mary", what="answer") == model.to_tokens(" Mary")[0]
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch

from ..errors import NNPatchTypeError, NNPatchValueError
from .devices import input_device  # noqa: F401  (where inputs go: its home is engine.devices)


# -- prompts ----------------------------------------------------------------------------------------

@dataclass
class Prompts:
    """One invoke's prompts as a block of rows: `ids` [prompts, width] and, when some positions are
    padding, `mask` [prompts, width] (1: a token, 0: padding; None: no padding). The block's layout
    is what the invoke sees: prompt lists are left-padded to their longest prompt, token ids given
    with an attention mask keep their own layout (right padding stays on the right)."""

    ids: torch.Tensor
    mask: torch.Tensor | None = None
    texts: list[str] | None = None  # the string prompts, to name them in errors

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def lengths(self) -> list[int]:
        """Real tokens per prompt (padding not counted)."""
        if self.mask is None:
            return [self.width] * self.ids.shape[0]
        return self.mask.sum(-1).tolist()

    def rows(self) -> list[list[int]]:
        """Each prompt's token ids without padding."""
        if self.mask is None:
            return self.ids.tolist()
        return [row[m].tolist() for row, m in zip(self.ids, self.mask.bool())]

    def name(self, row: int) -> str:
        """How errors name one prompt of the block."""
        if self.texts is not None:
            text = self.texts[row]
            return f"prompt {text[:60] + '...' if len(text) > 60 else text!r}"
        return f"prompt {row} (token ids)" if self.ids.shape[0] > 1 else "the prompt (token ids)"


def invoke_rows(tokenizer, value, attention_mask=None, *, pad_id: int = 0) -> Prompts:
    """One invoke's input as a `Prompts` block: a prompt, a list of prompts, token ids (list or
    integer tensor, 1-D or 2-D), or a tokenizer output; `attention_mask` (zeros mark padding, on
    either side) may come with token ids. An id tensor stays a tensor (no round trip through lists).
    Errors name what is wrong (an empty prompt, float ids, a 3-D tensor, unknown words)."""
    if _is_mapping(value):
        if "input_ids" not in value:
            raise NNPatchTypeError(
                f"an invoke's input is a mapping without 'input_ids' (keys: {sorted(value.keys())}); "
                "give a tokenizer output, or input_ids=... (and attention_mask=...)")
        given = value.get("attention_mask")
        if given is not None and attention_mask is not None:
            raise NNPatchTypeError("the attention mask is given twice: in the tokenizer output and as "
                                   "attention_mask=...; give it once")
        attention_mask = given if attention_mask is None else attention_mask
        value = value["input_ids"]
    if attention_mask is not None and _ragged(value):
        # Unpadded rows of different lengths (a tokenizer output without padding=True): the mask
        # can only drop tokens; nnpatch pads the rows itself.
        if not _ragged(attention_mask) or [len(m) for m in attention_mask] != [len(r) for r in value] \
                or any(m not in (0, 1) for row in attention_mask for m in row):
            raise NNPatchValueError(
                f"token id rows of lengths {[len(r) for r in value]} need an attention mask of 0s and "
                "1s with rows of the same lengths; pad the rows to one length, or leave the mask out")
        value = [[t for t, m in zip(r, row) if m] for r, row in zip(value, attention_mask)]
        attention_mask = None
    if attention_mask is None and isinstance(value, torch.Tensor) and value.dtype == torch.long \
            and value.dim() in (1, 2) and value.numel() > 0:
        return Prompts(value if value.dim() == 2 else value.reshape(1, -1))  # the common case, checked cheaply
    text = isinstance(value, str) or _is_text(value)
    if isinstance(value, torch.Tensor) or _is_array(value) or (attention_mask is not None and not text):
        ids = id_tensor(value)
        if attention_mask is None:
            return Prompts(ids)
        return Prompts(ids, _mask_tensor(attention_mask, ids))
    if attention_mask is not None:
        raise NNPatchTypeError("attention_mask=... goes with token ids; string prompts are padded by "
                               "nnpatch itself, so leave the mask out")
    texts = ([value] if isinstance(value, str) else list(value)) if text else None
    rows = token_rows(tokenizer, value)
    width = max(len(r) for r in rows)
    if all(len(r) == width for r in rows):
        return Prompts(torch.tensor(rows, dtype=torch.long), None, texts)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return Prompts(ids, mask, texts)


def token_rows(tokenizer, value, *, unknown_words: str = "error") -> list[list[int]]:
    """The token ids of every prompt in one invoke's input, without padding. Words of a string
    prompt that the tokenizer maps to its unknown token are an error, unless `unknown_words` is
    "keep" (then they come out as the unknown token's id)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)) and not value:
        raise NNPatchValueError("the list of prompts is empty: give at least one prompt")
    if _is_text(value):
        if tokenizer is None:
            raise NNPatchTypeError(
                "string prompts need a tokenizer: pass tokenizer= to LanguageModel, or give token ids")
        rows = []
        for text in value:
            ids = list(tokenizer(text)["input_ids"])
            if not ids:
                raise NNPatchValueError(f"prompt {text!r} has no tokens: every prompt needs at least one")
            if unknown_words == "error":
                _check_known(tokenizer, text, ids)
            rows.append(ids)
        return rows
    if isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
        raise NNPatchTypeError(
            f"a list of prompts mixes strings and {sorted({type(v).__name__ for v in value} - {'str'})}; "
            "give all strings or all token ids")
    if isinstance(value, (list, tuple)) and all(_is_id(v) for v in value):
        return [_id_list(value, None)]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) for v in value):
        return [_id_list(v, i) for i, v in enumerate(value)]
    if _is_mapping(value) or isinstance(value, torch.Tensor) or _is_array(value):
        return invoke_rows(tokenizer, value).rows()
    if isinstance(value, (list, tuple)):
        bad = next(v for v in value if not _is_id(v))
        raise NNPatchTypeError(
            f"token ids must be integers, but the prompt holds {type(bad).__name__} {bad!r}; give "
            "a string, a list of strings, or integer token ids")
    raise NNPatchTypeError(
        f"cannot read a prompt from {type(value).__name__}: give a string, a list of strings, "
        "token ids (list or tensor), or a tokenizer output")


def id_tensor(value) -> torch.Tensor:
    """Token ids as a long tensor [prompts, tokens], from a 1-D or 2-D integer tensor, array or
    rectangular list; float, boolean, 3-D or empty ids are an error that says so."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, (list, tuple)):
            rows = token_rows(None, value)  # checks every element is an integer
            if len({len(r) for r in rows}) > 1:
                raise NNPatchValueError(
                    f"token id rows of lengths {[len(r) for r in rows]} come with an attention mask, "
                    "so they must be padded to one length; pad them (and mark the padding with 0 "
                    "in the mask), or leave the mask out and nnpatch pads them")
            value = torch.tensor(rows, dtype=torch.long)
        else:
            value = torch.as_tensor(value)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise NNPatchTypeError(
            f"token ids must be integers, got a {str(value.dtype).replace('torch.', '')} tensor of shape "
            f"{tuple(value.shape)}; give integer ids (e.g. ids.long()), or a string prompt")
    if value.dim() not in (1, 2):
        raise NNPatchValueError(
            f"token ids must be 1-D [tokens] or 2-D [prompts, tokens], got a tensor of shape "
            f"{tuple(value.shape)}; an invoke's prompts are the rows of one 2-D tensor")
    if value.dim() == 1:
        value = value.reshape(1, value.shape[0])
    if value.shape[0] == 0:
        raise NNPatchValueError("the token id tensor holds no prompts (shape "
                                f"{tuple(value.shape)}): give at least one prompt")
    if value.shape[1] == 0:
        raise NNPatchValueError("the prompt has no tokens (token id tensor of shape "
                                f"{tuple(value.shape)}): every prompt needs at least one token")
    return value.long()


def _mask_tensor(mask, ids: torch.Tensor) -> torch.Tensor | None:
    """An attention mask as a 0/1 long tensor of the ids' shape; None when it marks no padding."""
    mask = torch.as_tensor(mask, device=ids.device)
    if mask.dim() == 1 and ids.shape[0] == 1:
        mask = mask.reshape(1, -1)
    if tuple(mask.shape) != tuple(ids.shape):
        raise NNPatchValueError(
            f"attention_mask has shape {tuple(mask.shape)} but the token ids have shape "
            f"{tuple(ids.shape)}; give one mask entry per token (1: a token, 0: padding)")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise NNPatchValueError(
            f"attention_mask holds values other than 0 and 1 ({sorted(set(mask.unique().tolist()))[:6]}); "
            "nnpatch reads it as padding (0) or token (1)")
    mask = mask.long()
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise NNPatchValueError(
            f"attention_mask marks every position of prompt {empty[0]} as padding: every prompt "
            "needs at least one token")
    return None if bool(mask.all()) else mask


def check_prompts(prompts: Prompts, *, vocab_size: int | None, context: tuple[int, str] | None,
                  where: str = "") -> None:
    """Token ids inside the vocabulary and prompts no longer than the model's context, or an error
    that names the prompt, the id or length, and the limit. `where` (e.g. " (invoke 2)") says
    which input it was; `context` is (limit, the config field it comes from)."""
    ids = prompts.ids
    if vocab_size is not None and ids.numel():
        if ids.numel() <= 4096:  # a prompt or a few: one call into torch, then Python ints
            rows = ids.tolist()
            lo, hi = min(map(min, rows)), max(map(max, rows))
        else:
            lo, hi = (int(x) for x in torch.aminmax(ids))
        if lo < 0 or hi >= vocab_size:  # the offending id is looked for only when there is one
            bad = (ids < 0) | (ids >= vocab_size)
            row, pos = bad.nonzero()[0].tolist()
            raise NNPatchValueError(
                f"{prompts.name(row)}{where}: token id {int(ids[row, pos])} at position {pos} is outside "
                f"the model's vocabulary of {vocab_size} tokens (ids 0 to {vocab_size - 1}); give ids "
                "made by this model's tokenizer")
    if context is not None and (prompts.mask is not None or ids.shape[1] > context[0]):
        limit, field = context
        lengths = prompts.lengths()
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] > limit:
            raise NNPatchValueError(
                f"{prompts.name(longest)}{where} is {lengths[longest]} tokens long, but the model's "
                f"context is {limit} tokens (config.{field}); shorten it to at most {limit} tokens "
                f"(e.g. keep its last {limit})")


def model_limits(module: torch.nn.Module) -> tuple[int | None, tuple[int, str] | None]:
    """(vocabulary size, (context length, its config field)) of a model; None where unknown."""
    vocab = None
    try:
        vocab = int(module.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        size = getattr(getattr(module, "config", None), "vocab_size", None)
        vocab = size if isinstance(size, int) and size > 0 else None
    config = getattr(module, "config", None)
    for field in ("n_positions", "max_position_embeddings"):
        limit = getattr(config, field, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return vocab, (limit, field)
    return vocab, None


def model_sizes(module: torch.nn.Module) -> frozenset[int]:
    """The sizes of a model's head and width dimensions, read from its config (empty without
    one): a padded batch is never exactly as long as one of these (`batching.batch_prompts`)."""
    config = getattr(module, "config", None)
    sizes = set()
    for field in ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
                  "intermediate_size", "n_head", "n_embd", "n_inner"):
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            sizes.add(value)
    heads, width = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if isinstance(heads, int) and isinstance(width, int) and heads > 0:
        sizes.add(width // heads)
    return frozenset(sizes)


def _check_known(tokenizer, text: str, ids: list[int]) -> None:
    """An error naming the words of `text` that the tokenizer maps to its unknown token (a word
    that is literally the unknown token is fine)."""
    unk_id, unk = getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "unk_token", None)
    if unk_id is None or unk_id not in ids:
        return
    words = None
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        words = [text[s:e].strip() for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
                 if i == unk_id and e > s]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # no offsets (a slow tokenizer)
        pieces = tokenizer.tokenize(text)
        words = [p for p, i in zip(pieces, tokenizer.convert_tokens_to_ids(pieces)) if i == unk_id]
    words = list(dict.fromkeys(w for w in words if w and w != unk))
    if words:
        raise NNPatchValueError(
            f"prompt {text!r} has words the tokenizer does not know: "
            f"{', '.join(map(repr, words))}; it would turn each into its unknown token {unk!r}, so "
            "the model would not see them. Use words of the model's vocabulary, or give token ids")


def _id_list(row, index: int | None) -> list[int]:
    if isinstance(row, tuple) or isinstance(row, list):
        for v in row:
            if not _is_id(v):
                which = "" if index is None else f" {index}"
                raise NNPatchTypeError(
                    f"token ids must be integers, but prompt{which} holds {type(v).__name__} {v!r}; "
                    "give integer ids, or string prompts")
    if not row:
        which = "the prompt" if index is None else f"prompt {index}"
        raise NNPatchValueError(f"{which} has no tokens: every prompt needs at least one token")
    return [int(v) for v in row]


def _ragged(value) -> bool:
    """A list of lists that are not all of one length."""
    return isinstance(value, (list, tuple)) and bool(value) \
        and all(isinstance(v, (list, tuple)) for v in value) and len({len(v) for v in value}) > 1


def _is_id(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_text(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)


def _is_mapping(value) -> bool:
    return hasattr(value, "keys") and hasattr(value, "__getitem__") and not isinstance(value, torch.Tensor)


def _is_array(value) -> bool:
    return hasattr(value, "__array__") and not isinstance(value, (list, tuple, str))


# -- answer tokens ----------------------------------------------------------------------------------

def token_id(tokenizer, value, *, what: str = "token", where: str = "", vocab_size: int | None = None) -> int:
    """The id of one token given as a string (" Mary") or an id; an error names `what` it was
    (e.g. "answer") and `where` (e.g. " (pair 3)") when it is not exactly one known token."""
    if isinstance(value, torch.Tensor) or _is_array(value):
        value = torch.as_tensor(value)
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise NNPatchTypeError(f"{what}{where} must be a token string or an integer id, got a "
                                   f"{str(value.dtype).replace('torch.', '')} tensor")
        if value.numel() != 1:
            raise NNPatchValueError(f"{what}{where} must be one token, got {value.numel()} token ids "
                                    f"(a tensor of shape {tuple(value.shape)}); give one id")
        value = int(value)
    if _is_id(value):
        value = int(value)
        if vocab_size and not 0 <= value < vocab_size:
            raise NNPatchValueError(f"{what} token id {value}{where} is outside the vocabulary of "
                                    f"{vocab_size} tokens (ids 0 to {vocab_size - 1})")
        return value
    if not isinstance(value, str):
        raise NNPatchTypeError(f"{what}{where} must be a token string or id, got {type(value).__name__}")
    if tokenizer is None:
        raise NNPatchTypeError(f"{what} {value!r} is a string but the model has no tokenizer; give its token id")
    ids = tokenizer(value, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 1 and unk is not None and ids[0] == unk and value.strip() != tokenizer.unk_token:
        raise NNPatchValueError(f"{what} {value!r}{where} is not in the model's vocabulary; it must be "
                                "exactly one token (many tokenizers keep a word's leading space, e.g. ' Mary')")
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise NNPatchValueError(
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
        raise NNPatchValueError(f"{len(values)} {what} tokens for {n} {units}; give one {what} for all "
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
