"""Envoys: a mirror of the module tree whose `.output`, `.input` and `.inputs` are live values.

`model.transformer.h[3].mlp` is the envoy of the module at path `transformer.h.3.mlp`. Inside an
invoke, reading `.output` returns that invoke's rows of the value the module computed (waiting
for the forward pass to get there); assigning it, or editing it in place, changes what the model
computes downstream.
"""
from __future__ import annotations

import difflib

import torch

from ..errors import NNPatchAttributeError, NNPatchError, NNPatchIndexError, NNPatchKeyError
from . import aliases
from .hooks import module_at, resolve
from .inputs import input_slot, read_input, with_input
from .invoke import current_invoke
from .module_source import Source
from .skip import request_skip

_OWN = ("output", "input", "inputs")


class Envoy:
    def __init__(self, module: torch.nn.Module, path: str, root, of=None):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_of", of)  # the invoke whose rows this tree reads, if not the current one

    # -- walking the tree ------------------------------------------------------------------------
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        module = object.__getattribute__(self, "_module")
        sub = module._modules.get(name) if hasattr(module, "_modules") else None
        if sub is not None:
            return self._child(name, sub)
        table = self._root.__dict__.get("_rename") or {}
        alias = aliases.lookup(table, module, self._path, name)
        if alias is not None:  # rename={...}: the aliased module's own envoy
            envoy = self
            for part in alias.split("."):
                envoy = envoy[part]
            return envoy
        try:
            return getattr(module, name)
        except AttributeError:
            pass
        names = [n for n, _ in module.named_children()] + [n for n, _ in module.named_parameters(recurse=False)]
        names += aliases.names_at(table, module, self._path)
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        where = self._path or "the model"
        hint = f"; did you mean {', '.join(close)}?" if close else f"; it has: {', '.join(names[:12])}"
        raise NNPatchAttributeError(f"{where} ({type(module).__name__}) has no module or attribute {name!r}{hint}")

    def _child(self, name: str, module: torch.nn.Module) -> "Envoy":
        """The envoy of `module`, this module's child `name`: the one made before, unless the
        model holds another module there now (replaced since)."""
        envoy = self._children.get(name)
        if envoy is None or envoy._module is not module:
            path = f"{self._path}.{name}" if self._path else name
            envoy = self._children[name] = Envoy(module, path, self._root, self._of)
        return envoy

    def __getitem__(self, key):
        module = self._module
        if isinstance(key, slice):  # `model.transformer.h[1:]`: the envoys of those modules
            return [self[i] for i in range(len(module))[key]]
        if isinstance(key, int):
            n = len(module)
            index = key + n if key < 0 else key
            if not 0 <= index < n:
                raise NNPatchIndexError(f"{self._path or 'model'} has {n} modules; index {key} is out of range")
            key = str(index)
        sub = module._modules.get(str(key))
        if sub is None:
            raise NNPatchKeyError(f"{self._path or 'model'} has no module {key!r}; it has {list(module._modules)}")
        return self._child(str(key), sub)

    def __call__(self, *args, **kwargs):
        """Run this module on the given inputs, e.g. the logit lens inside a trace:
        `model.lm_head(model.transformer.ln_f(h))`. Inside a trace the call runs aside from it:
        the trace's own reads and edits of this module do not see it."""
        inv = current_invoke()
        if inv is None or inv.pass_ is None:
            return self._module(*args, **kwargs)
        with inv.pass_.aside():
            return self._module(*args, **kwargs)

    def next(self, n: int = 1) -> "Envoy":
        """In a generation, move this invoke's reads of this module to its next call (the
        next step) and return the module: `model.transformer.h[0].next().output`."""
        inv = self._invoke()
        if inv.steps is None:
            raise NNPatchError(
                f"{self._path or 'model'}.next() moves to the module's next call in a generation, "
                "but this is a single forward pass (model.trace); open `with model.generate(prompt, "
                "max_new_tokens=N):` to read later steps")
        inv.steps.advance(self._path or "model", self._path, n)
        return self

    def __len__(self) -> int:
        return len(self._module)

    def __iter__(self):
        children = self._module._modules.items()  # a list, not a generator: one call, not one per child
        return iter([self[name] if sub is None else self._child(name, sub) for name, sub in children])

    def _resolve(self, path: str) -> torch.nn.Module:
        """The module at a path below this one, as the model is now. A module set, inserted or
        deleted since (`ModuleList.insert` and `del` renumber the list without telling anyone)
        changes what a path means, so a remembered module is used only while the path still
        leads to it; the full `resolve` (with its checks) runs when it does not."""
        cache = self.__dict__.setdefault("_by_path", {})
        module = cache.get(path)
        if module is None or module_at(self._module, path) is not module:
            module = cache[path] = resolve(self._module, path)
        return module

    # -- live values -----------------------------------------------------------------------------
    @property
    def output(self):
        """What this module returned, for the current invoke."""
        return self._read("output")

    @property
    def inputs(self):
        """(args, kwargs) this module was called with, for the current invoke."""
        return self._read("input")

    def _read(self, kind: str):
        inv = current_invoke()
        if inv is None or inv.tracer.model is not self._root:  # the common case checked inline
            inv = self._invoke()  # the full check, which explains what is wrong
        event = inv.at(self._path, kind)
        try:
            if self._of is None or self._of is inv:
                return inv.value(event)
            return inv.value_of(self._of, event)
        except AttributeError as e:
            # Python answers an AttributeError from a property by calling __getattr__, which would
            # say the module has no attribute 'output': say what failed instead
            name = "output" if kind == "output" else "inputs"
            raise NNPatchError(f"reading {self._path or 'model'}.{name} failed: {type(e).__name__}: {e}") from e

    @property
    def input(self):
        """The input of this module's call: its first positional argument, or for a module called
        by keyword, `hidden_states` (else its first tensor keyword argument)."""
        args, kwargs = self.inputs
        return read_input(args, kwargs, self._input_slot(args, kwargs))

    def _input_slot(self, args, kwargs):
        slot = input_slot(args, kwargs)
        if slot is None:
            raise NNPatchError(f"{self._path or 'model'} was called without a tensor input "
                               f"(keyword inputs: {sorted(kwargs)}); it has no .input, read .inputs instead")
        return slot

    @property
    def source(self) -> Source:
        """The operations of this module's forward (`print` it to list them); inside a trace,
        `.source.<name>.output` reads or sets one (see `module_source`)."""
        return Source(self)

    def skip(self, value) -> None:
        """Do not run this module for the current invoke: `value` is its output (same structure
        and shapes). Call it before the model reaches the module, or while reading its own input
        (`h.skip(h.input)`); see `skip`."""
        request_skip(self, value)

    def __setattr__(self, name, value):
        inv = self._invoke() if name in _OWN else None
        if inv is not None and self._of is not None and self._of is not inv:
            raise NNPatchAttributeError(
                f"{self._path or 'model'}.{name} of another invoke is read-only here; set it on "
                "the model inside that invoke, or copy its value into this invoke's module")
        if name == "output":
            inv.set_value(inv.at(self._path, "output"), value)
        elif name == "input":
            args, kwargs = self.inputs
            slot = self._input_slot(args, kwargs)
            if read_input(args, kwargs, slot) is not value:
                inv.set_value(inv.at(self._path, "input"), with_input(args, kwargs, slot, value))
        elif name == "inputs":
            inv.set_value(inv.at(self._path, "input"), value)
        else:
            raise NNPatchAttributeError(
                f"cannot set {name!r} on {self._path or 'the model'}: only .output, .input and "
                ".inputs can be set (to change the module itself, use its torch.nn.Module)")

    def _invoke(self):
        inv = current_invoke()
        if inv is None:
            where = self._path or "model"
            raise NNPatchError(
                f"{where}.output / .input exist only inside an invoke of a trace: write "
                f"`with model.trace(prompt):` or `with tracer.invoke(prompt):` around the code "
                "that reads them")
        traced = inv.tracer.model
        if traced is not self._root and traced._module is not self._root._module:
            raise NNPatchError(
                f"{self._path or 'model'} is a module of another model ({self._root!r} at "
                f"{id(self._root):#x}) than the one this trace runs ({traced!r} at {id(traced):#x}): "
                "a trace reads and edits only the model it was opened on. Open a separate trace "
                "for the other model, and pass values between them in variables")
        return inv

    def __repr__(self) -> str:
        return f"<Envoy {self._path or 'model'}: {type(self._module).__name__}>"

    def __dir__(self):
        return list(_OWN) + list(self._module._modules) + list(super().__dir__())

