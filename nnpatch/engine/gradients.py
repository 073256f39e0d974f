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

As in PyTorch, a backward accumulates into `.grad` of every leaf tensor that requires grad and
that `value` depends on: the user's own tensors (a steering vector, a probe) and the model's
parameters that require grad (those of a Hugging Face model do by default; call
`model.requires_grad_(False)` to keep them out, module values still get gradients). `gradient=`
and `inputs=` are respected. A plain `value.backward()` accumulates at once; `with
value.backward():` accumulates when the block ends, so the `.grad =` edits made in the block
count (as hooks registered before a PyTorch backward would); a leaf's `.grad` read in the block
shows what it will be. Each backward call accumulates once, however often the gradients are
recomputed and even when the engine runs the invoke's code again. The graph is kept
(retain_graph) so that several invokes can each run their own backward in one trace; each
accumulates its own contribution (in the batched graph, a leaf another invoke uses gets a zero
gradient rather than none). Under `torch.no_grad()` no graph is recorded and backward() raises.
"""
from __future__ import annotations

import dis
import functools
import sys
import weakref
from typing import Any

import torch

from ..errors import NNPatchError, NNPatchValueError
from .batching import map_tensors
from .invoke import current_invoke

# invoke -> the backward calls (by their number in the invoke's run) that have accumulated into
# leaves' .grad; an invoke whose code runs again from the start repeats those calls.
_ACCUMULATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class BackwardContext:
    """What `value.backward()` returns inside a trace; usable as a with-block."""

    def __init__(self, inv, value: torch.Tensor, gradient=None, inputs=None, block: bool = False):
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            raise NNPatchError(
                "backward() needs a tensor computed from module values of this trace's forward "
                f"pass; got {type(value).__name__}" + _no_grad_hint(value))
        self.inv, self.value, self.gradient = inv, value, gradient
        self.bases: list[torch.Tensor] = _bases(inv.pass_.handed_values())
        self.grads: dict[int, torch.Tensor | None] = {}
        self.derived: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.edits: list[tuple[torch.Tensor, Any, torch.Tensor]] = []
        self.given: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (tensor, its .grad, version)
        self.dirty = True
        # Leaves whose .grad this backward accumulates into: once, at once for a plain call and
        # when the block ends for `with value.backward():`.
        self.index = 0 if inv.backward is None else inv.backward.index + 1
        self.leaves: list[torch.Tensor] = _leaves(value, inputs)
        self.leaf_ids = {id(t) for t in self.leaves}
        self.leaf_grads: dict[int, torch.Tensor | None] | None = None
        self.block = block
        self.pending = bool(self.leaves) and self.index not in _ACCUMULATED.get(inv, ())
        inv.backward = self
        if self.pending and not block:
            self._compute(leaves=True)
            self._accumulate()
        else:
            self._compute()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        # An invoke being ended (GreenletExit) leaves nothing behind: nothing reads its
        # gradients, and if its code runs again, so does this backward.
        if exc_type is not None and not issubclass(exc_type, Exception):
            return False
        self.absorb_inplace_edits()
        if self.pending and self.block:
            if self.dirty or self.leaf_grads is None:
                self._compute(leaves=True)
            self._accumulate()
        elif self.dirty:
            self._compute()
        return False

    # -- computing -------------------------------------------------------------------------------
    def _compute(self, leaves: bool = False) -> None:
        """Gradients of the module values handed out (and, with `leaves`, of the leaves), with
        the edits made so far applied."""
        base_ids = {id(b) for b in self.bases}
        inputs = self.bases + ([t for t in self.leaves if id(t) not in base_ids] if leaves else [])
        handles = [t.register_hook(_replacer(region, g)) for t, region, g in self.edits]
        try:
            grads = torch.autograd.grad(self.value, inputs, grad_outputs=self.gradient,
                                        retain_graph=True, allow_unused=True) if inputs else ()
        finally:
            for h in reversed(handles):
                h.remove()
        raw = {id(t): g for t, g in zip(inputs, grads)}
        self.leaf_grads = {id(t): raw.get(id(t)) for t in self.leaves} if leaves else None
        self.grads = {id(b): (None if raw[id(b)] is None else raw[id(b)].contiguous()) for b in self.bases}
        # autograd.grad reports an input's gradient from before that input's own hooks ran;
        # an edited tensor's own gradient is the edit.
        for t, region, g in self.edits:
            if id(t) in self.grads and self.grads[id(t)] is not None:
                self.grads[id(t)] = _replacer(region, g)(self.grads[id(t)])
        self.derived = weakref.WeakKeyDictionary()
        self.dirty = False
        for value in self.inv.cache.values():
            map_tensors(self._attach, value)

    def _accumulate(self) -> None:
        """Add this backward's gradients into the leaves' .grad, as PyTorch's backward does."""
        grads, self.leaf_grads, self.pending = self.leaf_grads or {}, None, False
        _ACCUMULATED.setdefault(self.inv, set()).add(self.index)
        with torch.no_grad():
            for leaf in self.leaves:
                g = grads.pop(id(leaf), None)
                if g is not None:
                    _accumulate_into(leaf, g)

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

    def leaf_grad(self, t: torch.Tensor):
        """A leaf's .grad; inside `with value.backward():`, with this backward's share added."""
        if not (self.pending and self.block and id(t) in self.leaf_ids):
            return t.grad
        if self.dirty or self.leaf_grads is None:
            self._compute(leaves=True)
        g = self.leaf_grads.get(id(t))
        if g is None:
            return t.grad
        return g.clone() if t.grad is None else t.grad + g

    def handed(self, t: torch.Tensor, g: torch.Tensor) -> None:
        """A gradient given to the user: an in-place edit of it (`h.grad[:] = 0`) is an edit."""
        self.given.append((t, g, g._version))

    def absorb_inplace_edits(self) -> None:
        edited = [(t, g) for t, g, version in self.given if g._version != version]
        self.given = [(t, g, g._version) for t, g, _ in self.given]
        for t, g in edited:
            self.set_grad(t, g.detach().clone())

    def grad(self, t: torch.Tensor):
        self.absorb_inplace_edits()
        if t.is_leaf:
            return self.leaf_grad(t)
        if self.dirty:
            self._compute()
        base = self._base_of(t)
        if base is t:
            return self.grads[id(t)]
        if base is not None:
            g = self.grads[id(base)]
            return None if g is None else _part(g, base, t)
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
            raise NNPatchValueError(
                f"cannot set .grad: the tensor has shape {tuple(t.shape)}, the new gradient "
                f"{tuple(g.shape)}; give a gradient of the tensor's shape")
        if base is None:
            self.edits.append((t, None, g))
        else:
            region = None if base is t else (t.size(), t.stride(), t.storage_offset() - base.storage_offset())
            self.edits.append((base, region, g))
        self.dirty = True
        self.leaf_grads = None
        if not t.is_leaf:
            t.grad = g.detach()


def _part(g: torch.Tensor, base: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The gradient of `t`, a view of `base`, read from `base`'s gradient `g`. Autograd may hand
    `g` out as a view into a larger buffer (the gradient of one block of a concatenation), so
    the view is taken relative to where `g` starts, with `g` laid out as `base` is."""
    if g.stride() != base.stride():
        g = torch.empty_strided(base.size(), base.stride(), dtype=g.dtype, device=g.device).copy_(g)
    return g.as_strided(t.size(), t.stride(), g.storage_offset() + t.storage_offset() - base.storage_offset())


def _replacer(region, g: torch.Tensor):
    """A tensor hook replacing the gradient (or the part of it at `region`: size, stride and
    offset relative to the tensor's own start, in its contiguous layout) with `g`."""
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


def _leaves(value: torch.Tensor, inputs=None) -> list[torch.Tensor]:
    """The leaf tensors that require grad and that `value` depends on (of `inputs`, if given),
    found by walking the autograd graph back to its AccumulateGrad nodes."""
    if inputs is not None:
        inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        found = {id(t): t for t in inputs
                 if isinstance(t, torch.Tensor) and t.is_leaf and t.requires_grad}
        return list(found.values())
    if value.grad_fn is None:
        return [value]  # value itself is a leaf
    found = {}
    seen = set()
    todo = [value.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "AccumulateGrad":
            leaf = fn.variable
            if leaf.requires_grad:
                found.setdefault(id(leaf), leaf)
            continue
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return list(found.values())


def _accumulate_into(leaf: torch.Tensor, g: torch.Tensor) -> None:
    """PyTorch's AccumulateGrad: the first gradient is stored (in a buffer of the leaf's own,
    laid out like the leaf), later ones are added in place."""
    if leaf.grad is None:
        leaf.grad = g.clone() if g.is_sparse else \
            torch.empty_like(leaf, memory_format=torch.preserve_format).copy_(g)
    elif leaf.grad.is_sparse or leaf.grad.requires_grad:
        leaf.grad = leaf.grad + g
    else:
        leaf.grad.add_(g)


def _no_grad_hint(value) -> str:
    if not isinstance(value, torch.Tensor):
        return ""
    if not torch.is_grad_enabled():
        return (" that does not require grad: gradients are disabled here (the trace runs under "
                "torch.no_grad() or torch.inference_mode()), so no graph was recorded; run the "
                "trace with gradients enabled")
    return " that does not require grad"


def _opens_with(frame) -> bool:
    """Whether the call being made in `frame` is the context expression of a with-statement
    (`with value.backward():`), read from the instruction that follows the call."""
    return _with_follows(frame.f_code, frame.f_lasti)


@functools.lru_cache(maxsize=512)
def _with_follows(code, lasti: int) -> bool:
    following = [i.opname for i in dis.get_instructions(code) if i.offset > lasti][:2]
    if following[:1] in (["BEFORE_WITH"], ["SETUP_WITH"]):  # 3.11-3.13, 3.10
        return True
    return following == ["COPY", "LOAD_SPECIAL"]  # 3.14: the manager is copied, __exit__ loaded


# -- the functions the compiled trace body calls -----------------------------------------------------

def backward(value, gradient=None, *args, **kwargs):
    """`value.backward(...)` inside a trace."""
    inv = current_invoke()
    if inv is None:  # trace-level code after the forward pass: an ordinary backward
        value.backward(gradient, *args, **kwargs)
        return _Done()
    inputs = _inputs_argument(*args, **kwargs)
    return BackwardContext(inv, value, gradient, inputs, block=_opens_with(sys._getframe(1)))


def _inputs_argument(retain_graph=None, create_graph=False, inputs=None):
    """The rest of Tensor.backward's signature; the graph is always kept."""
    return inputs


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
        ctx.handed(t, g)
    return g


def set_grad(t, g) -> None:
    """`t.grad = g` inside a trace: replaces the gradient flowing further back from t (a leaf's
    .grad is set as it is, as in PyTorch)."""
    ctx = _context_for(t)
    if ctx is None or (isinstance(t, torch.Tensor) and t.is_leaf):
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
