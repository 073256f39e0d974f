"""Module outputs that nothing but the forward pass holds: handed out without a copy.

An invoke gets a private copy of every module value it reads (`forward._fresh`), so that its
in-place edits reach the value that flows on and nothing else: not the module's input (an
identity or dropout returns its input), not a buffer it returned a slice of, not a cache or
attribute where the module kept it. A copy costs a few microseconds per read, most of a read's
overhead on small models. When the output is held by nothing else at all, the copy changes
nothing: an edit of the output itself reaches exactly what it would reach in the copy. `unshared`
says when that is so, for a plain tensor outside autograd:

* no other tensor shares its storage, and it is no view (a view, or a tensor it is the base of,
  would see the edit);
* no C++ holder of it, and no Python reference to it beyond the ones of PyTorch's own module
  call and the hook that reads it. That number is measured once per process, with a probe
  module whose output is certainly unshared, called and hooked the same way;
* it is contiguous, as the copy would be.

Anything else (a subclass, a tensor that requires grad, sparse layouts, a private API missing
from this torch) is copied as before.

Example:
    >>> import torch
    >>> fresh = torch.ones(2)
    >>> kept = []
    >>> def hook(module, args, kwargs, output):
    ...     kept.append(unshared(output))
    >>> m = torch.nn.Identity()
    >>> _ = m.register_forward_hook(hook, with_kwargs=True)
    >>> _ = m(fresh)            # the output is the input, which the caller still holds
    >>> kept
    [False]
"""
from __future__ import annotations

import sys

import torch

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
_BASELINE: list[int] = []  # Python references to an unshared output, seen from inside `unshared`


def unshared(t) -> bool:
    """Whether module output `t`, as a forward hook receives it and passes it here directly,
    is held by nothing else (see the module docstring)."""
    if not _BASELINE:
        _calibrate()
    try:
        return (type(t) is torch.Tensor and not t.requires_grad and t.layout is torch.strided
                and t._base is None and t._use_count() == 1 and t.is_contiguous()
                and _storage_use_count(t.untyped_storage()._cdata) == 2  # t and this temporary
                and sys.getrefcount(t) <= _BASELINE[0])
    except Exception:  # noqa: BLE001 - a private API missing or changed: copy, as always
        return False


def _references(t) -> int:
    """sys.getrefcount(t) from a frame like `unshared`'s: called with the hook's argument."""
    return sys.getrefcount(t)


class _Probe(torch.nn.Module):
    def forward(self, x):
        return torch.zeros(1)  # held by nothing but the module call


def _calibrate() -> None:
    seen = []

    def hook(module, args, kwargs, output):
        seen.append(_references(output))

    probe = _Probe()
    probe.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        probe(None)
    # A missing private API makes every check fail (0 references is never enough).
    _BASELINE.append(seen[0] if _storage_use_count is not None and hasattr(torch.Tensor, "_use_count") else 0)
