"""`module.skip(value)`: the module is not run, and `value` is its output.

An invoke calls `model.transformer.h[1].skip(value)` before the model runs that module, or while
it reads the module's own input (`h.skip(h.input)`). PyTorch picks the function it calls for a
module before running the module's pre-hooks, so the skip works through a gate: for the duration
of a forward pass, a module that may be skipped (one whose input some invoke reads, or one named
in a `skip` call) gets an instance-level `forward` that, for a call with skips pending, returns the
skip value instead of running; every gate is removed in the forward pass's `finally`.

When one invoke's rows are the whole batch, the module really does not run: the value is checked
against the structure and shapes the module would return, computed with fake tensors (no
arithmetic), and a value that does not match is an error naming both. When other invokes share
the batch, the module runs for their rows and each skipping invoke's rows of its output are
replaced by its value (checked the same way), so that every invoke sees what it asked for.

Example:
    >>> import torch, nnpatch
    >>> net = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)))
    >>> with net.trace(torch.ones(1, 3)):
    ...     net[1].skip(net[1].input)          # net[1] passes its input through
    ...     out = net.output.save()
    >>> bool(torch.equal(out, net[0](torch.ones(1, 3))))
    True
"""
from __future__ import annotations

import sys
import weakref

import torch

from ..errors import NNPatchError, NNPatchValueError
from .batching import map_tensors

ABSENT = object()  # a module without an instance-level forward before its gate


def request_skip(envoy, value) -> None:
    """`envoy.skip(value)`, called from an invoke's program."""
    inv = envoy._invoke()
    path = envoy._path
    if envoy._of is not None and envoy._of is not inv:
        raise NNPatchError(f"{path or 'model'}.skip() of another invoke's tree: call skip on the model "
                           "inside the invoke whose rows should skip it")
    if not path:
        raise NNPatchError("the whole model cannot be skipped; skip one of its modules, e.g. "
                           "model.transformer.h[0].skip(value)")
    p = inv.pass_
    event = (path, "input")
    if p.current != event and (event in p.fired or (path, "output") in p.fired):
        raise NNPatchError(
            f"{path}.skip() came after the model had already run {path} for this forward pass; "
            f"call skip before reading any value the model computes after {path}'s input")
    install_gate(p, path)
    p.skips.setdefault(path, []).append((inv, value))


def install_gate(pass_, path: str) -> None:
    """Give the module at `path` a forward that honours pending skips (for this forward pass:
    the pass removes its gates with its hooks)."""
    if path in pass_.gates or not path:
        return
    module = pass_.model._resolve(path)
    original = module.forward

    def gate(*args, **kwargs):
        entries = pass_.skips.pop(path, None)
        if not entries or pass_.aside_depth > 0:
            if entries:
                pass_.skips[path] = entries
            return original(*args, **kwargs)
        return _skipped_call(pass_, path, module, original, entries, args, kwargs)

    pass_.gates[path] = ForwardRestore(module)
    module.forward = gate


class ForwardRestore:
    """Puts back a module's instance-level `forward` as it was (absent, or what it was) when
    removed like a hook handle (`hooks.remove_all`, which holds Ctrl-C back meanwhile)."""

    def __init__(self, module):
        self.module, self.previous = module, module.__dict__.get("forward", ABSENT)

    def remove(self) -> None:
        if self.previous is ABSENT:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous


def check_all_used(pass_) -> None:
    """A skip the model never reached (the module was already running) is an error, not a no-op."""
    left = [path for path, entries in pass_.skips.items() if entries]
    pass_.skips.clear()
    if left:
        raise NNPatchError(
            f"{left[0]}.skip() was called, but the model did not call {left[0]} afterwards in this "
            f"forward pass: it was already running (skip came after reading a value inside it) or "
            f"is not called for these inputs. Call skip before reading values inside {left[0]}")


def _skipped_call(pass_, path, module, original, entries, args, kwargs):
    size = pass_.batch.size
    if len(entries) == 1:
        inv, value = entries[0]
        rows = pass_.rows[inv]
        if rows.start == 0 and rows.stop == size and not rows.pad:  # the whole batch skips
            with pass_.aside():  # the probe's inner module calls are not the trace's
                expected = _expected_output(module, original, args, kwargs)
            if expected is not None:
                return _conform(value, expected, path)
    output = original(*args, **kwargs)  # other rows need the module: run it, then replace rows
    for inv, value in entries:
        rows = pass_.rows[inv]
        view = map_tensors(lambda t: rows.narrow(t, size), output)
        _write(view, _conform(value, view, path))
    return output


# What each module returned for the argument shapes it was probed with (probing costs a few ms).
_PROBED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _expected_output(module, original, args, kwargs):
    """What the module would return, as fake tensors (shapes, dtypes, structure; no arithmetic),
    or None when it cannot run on fake tensors. Cache objects in the arguments are left out, so
    that the probe changes nothing. Kept per module and argument shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    cache_type = getattr(sys.modules.get("transformers.cache_utils"), "Cache", None)

    def no_cache(v):
        return None if cache_type is not None and isinstance(v, cache_type) else v

    args = tuple(no_cache(a) for a in args)
    kwargs = {k: no_cache(v) for k, v in kwargs.items()}
    key = (_signature(args), _signature(kwargs))
    probed = _PROBED.setdefault(module, {})
    if key in probed:
        return probed[key]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            expected = original(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a module fake tensors cannot run: the caller runs it for real
        expected = None
    if len(probed) < 64:
        probed[key] = expected
    return expected


def _signature(value):
    """What decides the shapes a call returns: tensors' shapes, dtypes and devices, the values of
    plain Python arguments, and the identity of any other object."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, _signature(v)) for k, v in value.items()))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return ("object", id(value))


def _conform(value, expected, path: str):
    """`value` as the module's output: the same structure as `expected`, each tensor of its
    shape (or broadcastable to it), on its device and dtype, and a private copy."""
    problem = _mismatch(value, expected)
    if problem:
        raise NNPatchValueError(
            f"cannot skip {path} with this value: {path} returns {_describe(expected)}, the value "
            f"is {_describe(value)} ({problem}). Give a value of the same structure and shapes, "
            f"e.g. {path}.input for a module whose output has its input's shape")
    return _build(value, expected)


def _mismatch(value, expected) -> str | None:
    if isinstance(expected, torch.Tensor):
        if not isinstance(value, torch.Tensor):
            return f"a {type(value).__name__} where a tensor goes"
        try:
            ok = torch.broadcast_shapes(value.shape, expected.shape) == expected.shape
        except RuntimeError:
            ok = False
        return None if ok else f"shape {tuple(value.shape)} where {tuple(expected.shape)} goes"
    if isinstance(expected, (tuple, list)):
        if not isinstance(value, (tuple, list)) or len(value) != len(expected):
            return f"not a {type(expected).__name__} of {len(expected)} values"
        for v, e in zip(value, expected):
            problem = _mismatch(v, e)
            if problem:
                return problem
        return None
    if isinstance(value, torch.Tensor):
        return f"a tensor where {type(expected).__name__} goes"
    return None


def _build(value, expected):
    if isinstance(expected, torch.Tensor):
        return value.to(device=expected.device, dtype=expected.dtype).expand(expected.shape).clone()
    if isinstance(expected, (tuple, list)):
        return type(value)(_build(v, e) for v, e in zip(value, expected))
    return value


def _write(view, value) -> None:
    if isinstance(view, torch.Tensor):
        view.copy_(value)
    elif isinstance(view, (tuple, list)):
        for v, new in zip(view, value):
            _write(v, new)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of ({', '.join(_describe(v) for v in x)})"
    return "None" if x is None else f"a {type(x).__name__}"
