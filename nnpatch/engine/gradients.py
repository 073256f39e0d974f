"""Gradients inside traces: `value.backward()`, `x.grad` in any order, and `x.grad = g` edits.

An invoke's `value.backward()` (plain, or as `with value.backward():`) runs one backward pass
through the batched forward graph and computes, at once, the gradient of `value` with respect to
every module value handed out in this forward pass. Every tensor an invoke got from `.input` /
`.output` is a view of one of those values, so its gradient is the matching view of the computed
gradient: no re-injection, no reverse order. Gradients of other tensors (results of the user's
own arithmetic) are computed on first read.

`x.grad = g` replaces the gradient that flows further back from `x`. The edit is applied with a
tensor hook and the gradients are recomputed before the next read, so reads after an edit see
its effect.

Nothing accumulates into parameters' `.grad`; the graph is kept (retain_graph) so that several
invokes can each run their own backward in one trace.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

from ..errors import NNPatchError
from .batching import map_tensors
from .invoke import current_invoke


class BackwardContext:
    """What `value.backward()` returns inside a trace; usable as a with-block."""

    def __init__(self, inv, value: torch.Tensor, gradient=None):
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            raise NNPatchError(
                "backward() needs a tensor computed from module values of this trace's forward "
                f"pass; got {type(value).__name__}"
                + (" that does not require grad" if isinstance(value, torch.Tensor) else ""))
        self.inv, self.value, self.gradient = inv, value, gradient
        self.bases: list[torch.Tensor] = _bases(inv.pass_.fired.values())
        self.grads: dict[int, torch.Tensor | None] = {}
        self.derived: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.edits: list[tuple[torch.Tensor, Any, torch.Tensor]] = []
        self.dirty = True
        inv.backward = self
        self._compute()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.dirty:
            self._compute()
        return False

    # -- computing -------------------------------------------------------------------------------
    def _compute(self) -> None:
        handles = [t.register_hook(_replacer(region, g)) for t, region, g in self.edits]
        try:
            grads = torch.autograd.grad(self.value, self.bases, grad_outputs=self.gradient,
                                        retain_graph=True, allow_unused=True) if self.bases else ()
        finally:
            for h in reversed(handles):
                h.remove()
        self.grads = {id(b): (None if g is None else g.contiguous()) for b, g in zip(self.bases, grads)}
        # autograd.grad reports an input's gradient from before that input's own hooks ran;
        # an edited tensor's own gradient is the edit.
        for t, region, g in self.edits:
            if id(t) in self.grads and self.grads[id(t)] is not None:
                self.grads[id(t)] = _replacer(region, g)(self.grads[id(t)])
        self.derived = weakref.WeakKeyDictionary()
        self.dirty = False
        for value in self.inv.cache.values():
            map_tensors(self._attach, value)

    def _attach(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_leaf:
            t.grad = self.grad(t)
        return t

    def _base_of(self, t: torch.Tensor):
        if id(t) in self.grads:
            return t
        base = t._base
        if base is not None and id(base) in self.grads:
            return base
        return None

    def grad(self, t: torch.Tensor):
        if self.dirty:
            self._compute()
        base = self._base_of(t)
        if base is t:
            return self.grads[id(t)]
        if base is not None:
            g = self.grads[id(base)]
            return None if g is None else g.as_strided(t.size(), t.stride(), t.storage_offset())
        if t in self.derived:
            return self.derived[t]
        if not t.requires_grad:
            return None
        handles = [e.register_hook(_replacer(region, g)) for e, region, g in self.edits]
        try:
            (g,) = torch.autograd.grad(self.value, t, grad_outputs=self.gradient,
                                       retain_graph=True, allow_unused=True)
        finally:
            for h in reversed(handles):
                h.remove()
        self.derived[t] = g
        return g

    def set_grad(self, t: torch.Tensor, g) -> None:
        base = self._base_of(t)
        if not isinstance(g, torch.Tensor):
            g = torch.as_tensor(g, dtype=t.dtype, device=t.device)
        if g.shape != t.shape:
            raise NNPatchError(
                f"cannot set .grad: the tensor has shape {tuple(t.shape)}, the new gradient "
                f"{tuple(g.shape)}; give a gradient of the tensor's shape")
        if base is None:
            self.edits.append((t, None, g))
        else:
            region = None if base is t else (t.size(), t.stride(), t.storage_offset())
            self.edits.append((base, region, g))
        self.dirty = True
        if not t.is_leaf:
            t.grad = g.detach()


def _replacer(region, g: torch.Tensor):
    def hook(grad):
        if region is None:
            return g.to(grad.dtype).expand_as(grad).clone()
        grad = grad.contiguous().clone()
        grad.as_strided(*region).copy_(g)
        return grad
    return hook


def _bases(values) -> list[torch.Tensor]:
    found: dict[int, torch.Tensor] = {}

    def keep(t):
        if t.requires_grad:
            found.setdefault(id(t), t)
        return t

    for v in values:
        map_tensors(keep, v)
    return list(found.values())


# -- the functions the compiled trace body calls -----------------------------------------------------

def backward(value, gradient=None, *args, **kwargs):
    """`value.backward(...)` inside a trace."""
    inv = current_invoke()
    if inv is None:  # trace-level code after the forward pass: an ordinary backward
        value.backward(gradient, *args, **kwargs)
        return _Done()
    return BackwardContext(inv, value, gradient)


def get_grad(t):
    """`t.grad` inside a trace."""
    if not isinstance(t, torch.Tensor):
        return t.grad
    ctx = _context_for(t)
    if ctx is None:
        return t.grad
    g = ctx.grad(t)
    if not t.is_leaf and g is not None:
        t.grad = g
    return g


def set_grad(t, g) -> None:
    """`t.grad = g` inside a trace: replaces the gradient flowing further back from t."""
    ctx = _context_for(t)
    if ctx is None:
        t.grad = g
        return
    ctx.set_grad(t, g)


def _context_for(t):
    inv = current_invoke()
    return inv.backward if inv is not None else None


class _Done:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
