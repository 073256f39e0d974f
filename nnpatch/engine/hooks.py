"""Registering PyTorch hooks by module path, so that none can leak.

Every path is resolved before any hook is registered, and every handle is removed in a `finally`,
in reverse order: a typo in the third name, an error in a hook or a KeyboardInterrupt leaves the
model exactly as it was.
"""
from __future__ import annotations

import contextlib
import difflib
import _signal
import signal
import threading
import weakref
from typing import Callable, Iterable

import torch
from torch.utils.hooks import RemovableHandle

from ..errors import NNPatchAttributeError, NNPatchValueError

# kind: "input" registers a forward pre-hook fn(module, args, kwargs) -> None | (args, kwargs);
#       "output" registers a forward hook fn(module, args, kwargs, output) -> None | output.
HookSpec = tuple[str, str, Callable]


def resolve(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at a `named_modules()` path, or an error that lists the closest paths."""
    if path == "":
        return root
    module = module_at(root, path)
    if module is None:
        names = [n for n, _ in root.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise NNPatchAttributeError(f"the model has no module {path!r}{hint}")
    _check_not_shared(root, path, module)
    return module


def module_at(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The module at `path`, or None. By `_modules`, not `named_children()`: that lists a
    module held twice only at its first name."""
    module = root
    for part in path.split(".") if path else ():
        module = module._modules.get(part)
        if module is None:
            return None
    return module


# root module -> {id(module): the first named_modules() path of it}; ids, not modules, so that
# an entry does not keep its model alive
_FIRST_PATHS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, str]]" = weakref.WeakKeyDictionary()


def _check_not_shared(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """Refuse a later path of a module object that the model holds at several paths (one
    activation module placed in every block; transformers 5.5 with `kernels` installed gives
    every Llama attention the same `rotary_fn`). Its hooks fire at each of its calls and nothing
    tells which place a call comes from, so a hook at the second path would silently get the
    call from the first."""
    first = _FIRST_PATHS.get(root)
    where = None if first is None else first.get(id(module))
    if where is None or (where != path and module_at(root, where) is not module):  # new, or the model changed
        first = _FIRST_PATHS[root] = {id(m): p for p, m in root.named_modules()}
        where = first.get(id(module), path)
    if where != path:
        caller = path.rpartition(".")[0] or "the model"
        raise NNPatchValueError(
            f"{path} is the same {type(module).__name__} object as {where}: the model holds one module "
            f"at both paths, so its hooks fire at every call and cannot tell which place a call comes "
            f"from (a hook here would get the call at {where}, or whichever came first). Read or edit "
            f"the module that calls it here ({caller}), or give each place its own copy "
            f"(copy.deepcopy) before wrapping the model; {where}.output is its first call")


@contextlib.contextmanager
def hooks(root: torch.nn.Module, specs: Iterable[HookSpec]):
    """Attach hooks for the duration of a with-block; nothing stays attached afterwards."""
    resolved = [(resolve(root, path), kind, fn) for path, kind, fn in specs]
    handles = []
    try:
        for module, kind, fn in resolved:
            handles.append(attach(module, kind, fn))
        yield
    finally:
        remove_all(handles)


def remove_all(handles: list) -> None:
    """Remove hook handles in reverse order, all of them even if Ctrl-C lands meanwhile (the
    KeyboardInterrupt is raised once they are gone). Written out rather than as a context
    manager: every trace calls it."""
    if threading.get_ident() != _MAIN_THREAD:
        for h in reversed(handles):
            h.remove()
        return
    pending = []
    # _signal.signal: the same call as signal.signal, without converting handlers to enums
    previous = _signal.signal(_signal.SIGINT, lambda signum, frame: pending.append(signum))
    if previous is not signal.default_int_handler:  # someone else's handler: leave it alone
        _signal.signal(_signal.SIGINT, previous)
        pending = None
    try:
        for h in reversed(handles):
            h.remove()
    finally:
        if pending is not None:
            _signal.signal(_signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


_MAIN_THREAD = threading.main_thread().ident


def attach(module: torch.nn.Module, kind: str, fn: Callable) -> "_Handle":
    """Register `fn` as `kind` hook of `module` (with kwargs), as `register_forward_hook` /
    `register_forward_pre_hook(..., with_kwargs=True)` would, without building PyTorch's
    RemovableHandle (weak references to three dicts): a trace attaches one per module it reads.
    The id comes from RemovableHandle's counter, so it never collides with PyTorch's own."""
    if kind == "input":
        hooks, kwargs = module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs
    elif kind == "output":
        hooks, kwargs = module._forward_hooks, module._forward_hooks_with_kwargs
    else:
        raise ValueError(f"hook kind must be 'input' or 'output', got {kind!r}")
    key = RemovableHandle.next_id
    RemovableHandle.next_id = key + 1
    hooks[key] = fn
    kwargs[key] = True
    return _Handle((hooks, kwargs, key))


class _Handle(tuple):
    """(hooks, kwargs, key) of one hook that `attach` registered; `remove()` removes it
    (idempotent, like RemovableHandle.remove). A tuple: made without a Python-level __init__."""

    __slots__ = ()

    def remove(self) -> None:
        hooks, kwargs, key = self
        hooks.pop(key, None)
        kwargs.pop(key, None)


_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def exclusive(module: torch.nn.Module) -> threading.RLock:
    """One trace or sweep of a model at a time, as `with exclusive(module):`: another thread's
    trace of the same model waits there until this one is done (a plain forward from another
    thread is not held up, and the trace's hooks ignore it). The lock itself is the context
    manager."""
    lock = _LOCKS.get(module)
    if lock is None:
        with _LOCKS_GUARD:
            lock = _LOCKS.setdefault(module, threading.RLock())
    return lock
