"""Turning the inputs of several invokes into one batched forward call, and back.

Every invoke owns a block of batch rows. Each invoke's block of language-model prompts
(`inputs.Prompts`: string prompts left-padded to the invoke's longest, token ids with an attention
mask in their own layout) is left-padded to the widest block of the batch, with an attention mask
and position ids that count only real tokens, so every prompt computes what it computes alone and
position -1 is every left-padded prompt's last token. An invoke then sees only its own rows and
its own width: the batch's extra left padding is cut from the dimensions that are positions
(`Rows.narrow`, `position_dims`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import NNPatchTypeError, NNPatchValueError
from .inputs import Prompts


def position_dims(shape: torch.Size | tuple[int, ...], seq_len: int) -> tuple[int, ...]:
    """The dimensions of a batched tensor [batch, ...] that are its sequence positions, judged by
    shape alone, given the batch's padded length `seq_len`. Only two layouts count:

    - [batch, seq_len, ...]: hidden states, logits, position ids, masks, rotary tables: dim 1.
      A 3-D [batch, seq_len, seq_len] is read this way (hidden states of width seq_len); in 4 or
      more dims, another dimension of size seq_len makes the layout ambiguous ([batch, pos,
      heads, head_dim] with heads == seq_len, or [batch, heads, pos, head_dim]), so nothing is.
    - [batch, X, seq_len, seq_len] (exactly 4-D): attention weights [batch, heads, query, key]
      and 4-D attention masks [batch, 1, query, key]: dims 2 and 3, whatever X is (also when the
      number of heads equals seq_len).

    Any other tensor has no position dimension, e.g. [batch, heads, pos, head_dim] with heads !=
    seq_len, [batch, features], or [pos] without a batch dimension. (A [batch, heads, pos,
    head_dim] with head_dim == seq_len would look like attention weights; for a model with a
    config, `batch_prompts` keeps the padded length off its head counts and widths, so that this
    and the ambiguous cases above do not arise.)

        >>> position_dims((2, 7, 32), 7), position_dims((2, 4, 7, 7), 7), position_dims((2, 7, 7, 7), 7)
        ((1,), (2, 3), (2, 3))
        >>> position_dims((2, 4, 7, 8), 7), position_dims((2, 7, 7, 8), 7)
        ((), ())
    """
    n = len(shape)
    if n == 4 and shape[2] == seq_len and shape[3] == seq_len:
        return (2, 3)
    if n >= 2 and shape[1] == seq_len and (n <= 3 or seq_len not in tuple(shape[2:])):
        return (1,)
    return ()


@dataclass(frozen=True)
class Rows:
    """Where one invoke's data lies in the batched forward pass."""

    start: int  # first batch row
    stop: int  # one past the last batch row
    pad: int = 0  # left-padding positions of the batch that this invoke does not see
    seq_len: int | None = None  # sequence length of the batched input (None: not a sequence model)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def narrow(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This invoke's view of a batched tensor (a view: in-place edits reach the batch).

        A tensor whose first dimension is the batch gives this invoke its rows; one that is not
        batched (a different first size, a scalar) is returned whole. When the batch is padded
        beyond this invoke's prompts (`pad` > 0), the padding is cut from the dimensions that
        `position_dims` finds to be positions: [batch, pos, ...] values (hidden states, logits)
        and [batch, heads, query, key] attention weights show exactly the invoke's own positions.
        Any other tensor keeps the batch's full padded length in every dimension but the batch,
        with the extra padding first (left), so its last position is still the prompt's last
        token: e.g. [batch, heads, pos, head_dim] key/value states, or a [batch, pos, heads,
        head_dim] tensor in which another dimension happens to equal the padded length. The
        padded length is the widest invoke's, or a little more when that width equals one of the
        model's head counts or widths, or the batch size (see `batch_prompts`). Values at padding
        positions are whatever the model computed there and mean nothing.

        When the padded length equals the batch size, a 1-D tensor of that length may be
        positions rather than rows, so it is returned whole rather than cut by coincidence.
        """
        if not self.batched(x, batch_size):
            return x
        if self.start == 0 and self.stop == batch_size and not self.pad:
            return x  # the whole batch is this invoke's
        return self.trim(x[self.start:self.stop])

    def batched(self, x, batch_size: int) -> bool:
        """Whether `x` is a batched tensor whose rows are cut per invoke."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch_size:
            return False
        return not (x.dim() == 1 and self.seq_len == batch_size)  # [batch] or [pos]: ambiguous

    def trim(self, x: torch.Tensor) -> torch.Tensor:
        """This invoke's rows `x` of a batched tensor without the batch's extra left padding."""
        if self.pad:
            for dim in position_dims(x.shape, self.seq_len):
                x = x.narrow(dim, self.pad, self.seq_len - self.pad)
        return x


@dataclass
class Batch:
    """One forward call's arguments and each invoke's rows in it."""

    args: tuple
    kwargs: dict
    rows: list[Rows]
    size: int  # batch size of the forward call


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """Apply `fn` to every tensor in a (nested) tuple / list / dict, keeping the structure."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(map_tensors(fn, v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    if isinstance(value, dict) and type(value) is dict:
        return {k: map_tensors(fn, v) for k, v in value.items()}
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # transformers ModelOutput
        out = value.__class__(**{k: map_tensors(fn, value[k]) for k in value.keys()})
        return out
    return value


def batch_generic(invokes: list[tuple[tuple, dict]]) -> Batch:
    """Concatenate tensor arguments of plain-module invokes along the batch dimension."""
    if len(invokes) == 1:
        args, kwargs = invokes[0]
        n = _batch_size(args, kwargs)
        return Batch(tuple(args), dict(kwargs), [Rows(0, n)], n)
    rows, start = [], 0
    for args, kwargs in invokes:
        n = _batch_size(args, kwargs)
        rows.append(Rows(start, start + n))
        start += n
    first_args, first_kwargs = invokes[0]
    args = tuple(_cat([a[i] for a, _ in invokes], f"positional argument {i}") for i in range(len(first_args)))
    if any(len(a) != len(first_args) for a, _ in invokes):
        raise NNPatchTypeError(
            f"every invoke of a trace must pass the same number of positional inputs, got "
            f"{[len(a) for a, _ in invokes]}")
    kwargs = {k: _cat([kw[k] for _, kw in invokes], f"keyword argument {k!r}") for k in first_kwargs}
    return Batch(args, kwargs, rows, start)


def _batch_size(args, kwargs) -> int:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise NNPatchTypeError("an invoke needs at least one tensor input with a batch dimension, got "
                           f"{[type(v).__name__ for v in list(args) + list(kwargs.values())]}")


def _cat(values: list, what: str):
    if all(isinstance(v, torch.Tensor) for v in values):
        shapes = {tuple(v.shape[1:]) for v in values}
        if len(shapes) > 1:
            raise NNPatchValueError(
                f"cannot batch the invokes' {what}: shapes {[tuple(v.shape) for v in values]} differ "
                "beyond the batch dimension; give every invoke inputs of the same trailing shape, "
                "or run them in separate traces")
        return torch.cat(values, dim=0)
    if all(v is values[0] or v == values[0] for v in values):
        return values[0]
    raise NNPatchValueError(f"the invokes' {what} differ and are not tensors, so they cannot be batched; "
                            "give every invoke the same value, or run them in separate traces")


def batch_prompts(blocks: list[Prompts], pad_id: int, accepts: set[str], *,
                  avoid: frozenset[int] = frozenset(), limit: int | None = None) -> Batch:
    """One forward call for every invoke's block of prompts: each block is left-padded to the
    widest block (its own layout, right padding included, is kept), with the attention mask and
    the position ids that make every prompt compute what it computes alone.

    A padded batch is made a little longer than the widest block when that width equals one of
    the sizes in `avoid` (the model's head counts and widths) or the batch size, up to `limit`
    (the model's context): then no head or width dimension of any tensor has the padded length,
    and `position_dims` cannot take it for positions by coincidence."""
    use_cache = {"use_cache": False} if "use_cache" in accepts else {}
    if len(blocks) == 1 and blocks[0].mask is None:  # one block, nothing to pad: the common case
        n, width = blocks[0].ids.shape
        return Batch((), {"input_ids": blocks[0].ids, **use_cache}, [Rows(0, n, 0, width)], n)
    widths = [b.width for b in blocks]
    n = sum(b.ids.shape[0] for b in blocks)
    T = max(widths)
    padded = any(b.mask is not None for b in blocks) or len(set(widths)) > 1
    if padded:
        longer = T
        while longer in avoid or longer == n:
            longer += 1
        T = longer if limit is None or longer <= limit else T
    rows, start = [], 0
    for b in blocks:
        rows.append(Rows(start, start + b.ids.shape[0], T - b.width, T))
        start += b.ids.shape[0]
    device = blocks[0].ids.device
    if not padded:
        ids = torch.cat([b.ids.to(device) for b in blocks])
        return Batch((), {"input_ids": ids, **use_cache}, rows, start)
    if "attention_mask" not in accepts:
        raise NNPatchValueError(
            f"the prompts need padding (widths {widths}), but the model's forward takes no "
            "attention_mask, so padding would change what it computes; give every invoke prompts "
            "of one length, or run them in separate traces")
    ids = torch.full((start, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((start, T), dtype=torch.long, device=device)
    for b, r in zip(blocks, rows):
        ids[r.start:r.stop, r.pad:] = b.ids
        mask[r.start:r.stop, r.pad:] = 1 if b.mask is None else b.mask
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in accepts:
        # Absolute position embeddings (GPT-2) must count from each prompt's first real token.
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch((), {**kwargs, **use_cache}, rows, start)


def forward_parameters(module: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()
