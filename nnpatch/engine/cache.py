"""`tracer.cache(...)`: record many modules' outputs (and inputs) at once, for one invoke.

A `Cache` is declared at the start of an invoke (`cache = tracer.cache()`); the forward pass then
records, for every module it names (all by default), that invoke's rows of the value the module
returned, after every invoke's edits at that module (post-intervention), detached and copied
(to the CPU by default). It is read after the trace by module path or by attribute:

    cache["transformer.h.0"].output       # the path from named_modules()
    cache["model.transformer.h.0"].output # nnsight's spelling, with the root named `model`
    cache.transformer.h[0].output         # walking the module tree (`rename=` aliases too)

A module called several times in one trace (a module shared between layers, or one call per
generation step) records one `Entry` per call, in call order: `cache[path].calls` is that list,
and `.output` is the single value when there was one call, else the list of values (nnsight's
convention). Each entry carries the cache's `step` when it was recorded: a driver that runs one
forward pass per generation step sets `cache.step = k` before step k's pass, and the entries of
all steps accumulate. When an invoke continues in a further forward pass of the same step (a
dependency on another invoke), that pass replays the earlier values and its calls replace the
ones the step recorded before.

Example:
    >>> import torch, nnpatch
    >>> net = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()))
    >>> with net.trace(torch.ones(2, 3)) as tracer:
    ...     cache = tracer.cache()
    >>> cache["0"].output.shape, sorted(cache.keys())
    (torch.Size([2, 4]), ['', '0', '1'])
    >>> bool(torch.equal(cache[1].output, net(torch.ones(2, 3))))
    True
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NNPatchError, NNPatchKeyError, NNPatchTypeError, NNPatchValueError
from .batching import map_tensors
from .inputs import input_slot, read_input


@dataclass
class Entry:
    """One call of a module: its output and (with include_inputs=True) its (args, kwargs)."""

    output: Any = None
    inputs: tuple | None = None
    step: int = 0  # the cache's step when it was recorded (a generation step; 0 in a trace)

    @property
    def input(self) -> Any:
        """The call's input: its first positional argument, else `hidden_states` or the first
        tensor keyword argument (as `Envoy.input`)."""
        if self.inputs is None:
            return None
        args, kwargs = self.inputs
        slot = input_slot(args, kwargs)
        return None if slot is None else read_input(args, kwargs, slot)


class Cache:
    """What `tracer.cache(...)` returns: every recorded call of the cached modules, by path.

    Memory: one copy of each cached value for the invoke's rows, i.e. for a transformer with
    L blocks and hidden width d, roughly (a few tensors per block) x L x rows x positions x d
    values of the model's dtype, plus the logits (rows x positions x vocabulary) for the root
    and the LM head; include_inputs=True about doubles it. Pass `modules=[...]` to keep only
    what you need, and `device=None` to keep values where the model computed them (the default
    copies them to the CPU, so that a GPU model's cache does not hold GPU memory).
    """

    def __init__(self, model, paths: list[str] | None, *, include_output: bool, include_inputs: bool,
                 device, dtype, detach: bool):
        self._model = model
        self._paths = paths  # None: every module
        self._include_output, self._include_inputs = include_output, include_inputs
        self._device, self._dtype, self._detach = device, dtype, detach
        self.entries: dict[str, list[Entry]] = {}
        self.step = 0

    # -- recording (called by the forward pass) ----------------------------------------------------
    def attach(self, pass_, inv) -> None:
        """Record `inv`'s rows in this forward pass (what earlier passes of this step recorded is
        replaced: a further pass replays those values)."""
        kept = {p: [e for e in calls if e.step != self.step] for p, calls in self.entries.items()}
        self.entries = {p: calls for p, calls in kept.items() if calls}
        paths = self._paths if self._paths is not None else [p for p, _ in self._model._module.named_modules()]
        for path in paths:
            if self._include_inputs:
                pass_.record((path, "input"), self._recorder(inv))
            if self._include_output:
                pass_.record((path, "output"), self._recorder(inv))

    def _recorder(self, inv):
        def record(pass_, event):
            value = map_tensors(self._copy, pass_.view(inv, event))
            path, kind = event[0], event[1]
            step = event[2] if len(event) > 2 else self.step  # a generation's events carry their step
            calls = self.entries.setdefault(path, [])
            # A module's input comes before its output: the output completes the call that its
            # input opened, unless that call already has one (a new call without an input hook).
            if kind == "output" and self._include_inputs and calls and calls[-1].output is _OPEN:
                calls[-1].output = value
            elif kind == "output":
                calls.append(Entry(output=value, step=step))
            else:
                calls.append(Entry(output=_OPEN if self._include_output else None, inputs=value, step=step))
        return record

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        if self._detach:
            t = t.detach()
        return t.to(device=self._device or t.device, dtype=self._dtype or t.dtype, copy=True)

    # -- reading ---------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """The recorded module paths, in the order of their first record: the order the modules
        were called in with include_inputs=True, else the order they returned in."""
        return list(self.entries)

    def __contains__(self, key) -> bool:
        try:
            return self._path(key) in self.entries
        except (NNPatchError, KeyError, IndexError, AttributeError):
            return False

    def __getitem__(self, key) -> "CacheView":
        return CacheView(self, self._path(key))

    def __getattr__(self, name: str) -> "CacheView":
        if name.startswith("_"):
            raise AttributeError(name)
        if name == "model":  # nnsight names the root `model` (see CacheView)
            inner = "model" if "model" in self._model._module._modules else None
            return CacheView(self, "", fallback=inner)
        return CacheView(self, "")._walk(name)

    def __len__(self) -> int:
        return len(self.entries)

    def _path(self, key) -> str:
        if isinstance(key, int):
            return CacheView(self, "")._walk(key)._path
        return module_path(self._model, key)

    def __repr__(self) -> str:
        return f"Cache({len(self.entries)} modules recorded)"


_OPEN = object()  # an output slot whose call has not returned yet


class CacheView:
    """The recorded calls of one module: `.output`, `.input`, `.inputs`, `.calls`; walking on
    (`view.mlp`, `view[0]`) reaches the modules below it."""

    def __init__(self, cache: Cache, path: str, fallback: str | None = None):
        self._cache, self._path = cache, path
        # `cache.model` is the root, as in nnsight; for a model whose root has a child named
        # `model` (Llama), names the root lacks are looked up on that child, so that
        # `cache.model.layers[0]` (nnpatch's path) and `cache.model.model.layers[0]` both work.
        self._fallback = fallback

    @property
    def calls(self) -> list[Entry]:
        """Every recorded call of this module, in call order (one per generation step, say)."""
        found = self._cache.entries.get(self._path)
        if found is None:
            where = self._path or "the model"
            raise NNPatchKeyError(
                f"{where} was not recorded by this cache: it was not among the cached modules, or "
                "the model did not call it (tracer.stop() before it, a skipped parent). Recorded: "
                f"{', '.join(list(self._cache.entries)[:8]) or 'nothing'}")
        for entry in found:
            if entry.output is _OPEN:  # a call that never returned (tracer.stop() inside it)
                entry.output = None
        return found

    def _values(self, attr: str):
        values = [getattr(e, attr) for e in self.calls]
        return values[0] if len(values) == 1 else values

    @property
    def output(self):
        """The module's output (its list over calls, when it was called several times)."""
        return self._values("output")

    @property
    def inputs(self):
        """(args, kwargs) of the call (a list over calls); needs include_inputs=True."""
        return self._values("inputs")

    @property
    def input(self):
        """The call's first input (a list over calls); needs include_inputs=True."""
        return self._values("input")

    def __len__(self) -> int:
        return len(self.calls)

    def __getattr__(self, name: str) -> "CacheView":
        if name.startswith("_"):
            raise AttributeError(name)
        return self._walk(name)

    def __getitem__(self, key) -> "CacheView":
        return self._walk(key)

    def _walk(self, key) -> "CacheView":
        try:
            return self._step(self._path, key)
        except (NNPatchError, AttributeError, KeyError, IndexError):
            if self._fallback is None:
                raise
            return self._step(self._fallback, key)

    def _step(self, path: str, key) -> "CacheView":
        envoy = self._cache._model
        for part in filter(None, path.split(".")):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        child = envoy[key] if isinstance(key, int) else getattr(envoy, key)
        return CacheView(self._cache, child._path)

    def __repr__(self) -> str:
        n = len(self._cache.entries.get(self._path, ()))
        return f"<CacheView {self._path or 'model'}: {n} calls>"


def make_cache(tracer, modules, *, include_output: bool = True, include_inputs: bool = False,
               device="cpu", dtype=None, detach: bool = True) -> Cache:
    """`tracer.cache(...)`: checks the modules (every one before anything is recorded) and
    registers the cache with the invoke that declares it."""
    from .invoke import current_invoke
    inv = current_invoke()
    if inv is None or inv.tracer is not tracer:
        raise NNPatchError(
            "tracer.cache() records one invoke's rows: call it inside a `with tracer.invoke(...)` "
            "block (or the body of `model.trace(input)`); an empty `tracer.invoke()` records the "
            "whole batch")
    if inv.last_event is not None or (inv.pass_ is not None and inv.pass_.ticks > 0):
        raise NNPatchError(
            f"tracer.cache() must come before invoke {inv.index} reads or sets any module value "
            f"(it is already at {inv.last_event and '.'.join(filter(None, inv.last_event)) or 'a later module'}): "
            "declare the cache at the start of the invoke")
    model = tracer.model
    if modules is not None:
        if isinstance(modules, (str, torch.nn.Module)) or not hasattr(modules, "__iter__"):
            modules = [modules]
        modules = list(dict.fromkeys(module_path(model, m) for m in modules))
    cache = Cache(model, modules, include_output=include_output, include_inputs=include_inputs,
                  device=device, dtype=dtype, detach=detach)
    inv.caches.append(cache)
    return cache


def module_path(model, spec) -> str:
    """The `named_modules()` path of a module given as an envoy, a path (nnsight's
    `model.`-prefixed spelling and `rename=` aliases accepted) or a torch module."""
    from .envoy import Envoy
    if isinstance(spec, Envoy):
        if spec._root._module is not model._module:
            raise NNPatchValueError(f"{spec!r} is a module of another model than {model!r}")
        return spec._path
    if isinstance(spec, torch.nn.Module):
        for path, m in model._module.named_modules():
            if m is spec:
                return path
        raise NNPatchValueError(f"the {type(spec).__name__} given is not a module of {model!r}")
    if not isinstance(spec, str):
        raise NNPatchTypeError(
            f"a module is given as an envoy (model.transformer.h[0]) or a path string "
            f"('transformer.h.0'), got {type(spec).__name__}")
    tries = [spec]
    if spec == "model":
        tries.append("")
    elif spec.startswith("model."):
        tries.append(spec[len("model."):])
    for path in tries:
        found = _walk(model, path)
        if found is not None:
            return found
    names = [p for p, _ in model._module.named_modules() if p]
    close = difflib.get_close_matches(spec.removeprefix("model."), names, n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; its modules include {', '.join(names[:6])}"
    raise NNPatchKeyError(f"the model has no module {spec!r}{hint}")


def _walk(model, path: str) -> str | None:
    from .envoy import Envoy
    envoy = model
    for part in filter(None, path.split(".")):
        try:
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        except (AttributeError, KeyError, IndexError, NNPatchError):
            return None
        if not isinstance(envoy, Envoy):  # an attribute of the module, not a submodule
            return None
    return envoy._path

