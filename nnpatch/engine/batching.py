"""Turning the inputs of several invokes into one batched forward call, and back.

Every invoke owns a block of batch rows. Language-model prompts of different lengths are
left-padded to the longest prompt of the whole batch so that position -1 is every prompt's last
token; an invoke then sees only its own rows and only as many positions as its own longest prompt
needs (`Rows.pad` positions are cut from the left).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import NNPatchError


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
        """This invoke's view of a batched tensor (a view: in-place edits reach the batch)."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch_size:
            return x
        if self.start == 0 and self.stop == batch_size and not self.pad:
            return x  # the whole batch is this invoke's
        x = x[self.start:self.stop]
        if self.pad and x.dim() >= 2 and x.shape[1] == self.seq_len:
            x = x[:, self.pad:]
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
        raise NNPatchError("every invoke of a trace must pass the same number of positional inputs")
    kwargs = {k: _cat([kw[k] for _, kw in invokes], f"keyword argument {k!r}") for k in first_kwargs}
    return Batch(args, kwargs, rows, start)


def _batch_size(args, kwargs) -> int:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise NNPatchError("an invoke needs at least one tensor input with a batch dimension")


def _cat(values: list, what: str):
    if all(isinstance(v, torch.Tensor) for v in values):
        shapes = {tuple(v.shape[1:]) for v in values}
        if len(shapes) > 1:
            raise NNPatchError(
                f"cannot batch the invokes' {what}: shapes {[tuple(v.shape) for v in values]} differ "
                "beyond the batch dimension; give every invoke inputs of the same trailing shape, "
                "or run them in separate traces")
        return torch.cat(values, dim=0)
    if all(v is values[0] or v == values[0] for v in values):
        return values[0]
    raise NNPatchError(f"the invokes' {what} differ and are not tensors, so they cannot be batched")


def batch_prompts(tokenizer, invokes: list, pad_id: int, accepts: set[str]) -> Batch:
    """Left-pad every invoke's prompts to the longest prompt of the batch."""
    if all(isinstance(rows, torch.Tensor) for rows in invokes) and \
            len({rows.shape[1] for rows in invokes}) == 1 and invokes[0].shape[1] > 0:
        ids = torch.cat(invokes) if len(invokes) > 1 else invokes[0]  # nothing to pad
        T, rows, start = ids.shape[1], [], 0
        for block in invokes:
            rows.append(Rows(start, start + block.shape[0], 0, T))
            start += block.shape[0]
        kwargs = {"input_ids": ids, **({"use_cache": False} if "use_cache" in accepts else {})}
        return Batch((), kwargs, rows, start)
    invokes = [rows.tolist() if isinstance(rows, torch.Tensor) else rows for rows in invokes]
    seqs = [s for rows in invokes for s in rows]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise NNPatchError("an invoke has an empty prompt: every prompt needs at least one token")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    rows, start = [], 0
    for prompts in invokes:
        own = max(len(s) for s in prompts)
        rows.append(Rows(start, start + len(prompts), T - own, T))
        start += len(prompts)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if not bool(mask.all()):
        if "attention_mask" in accepts:
            kwargs["attention_mask"] = mask
        if "position_ids" in accepts:
            # Absolute position embeddings (GPT-2) must count from each prompt's first real token.
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if "use_cache" in accepts:
        kwargs["use_cache"] = False
    return Batch((), kwargs, rows, len(seqs))


def forward_parameters(module: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()
