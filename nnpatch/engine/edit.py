"""`model.edit()`: interventions that apply to every later trace of a model.

The body of `with model.edit() as (tracer, edited):` is not run when the block is left: nnpatch
compiles it as it compiles a trace body (`source`) and keeps it, with the values of the names it
reads as they are at that moment. Every later forward pass of a trace of the edited model then
runs it first, as a promptless invoke over the whole batch (`default_invokes`): its edits are in
place before the trace's own invokes read or set anything, in each forward pass (also a further
pass that a dependency between invokes needs). Its variables stay its own.

`model.edit()` edits a copy: `edited` shares the torch module with `model`, `model` itself stays
unedited. `model.edit(inplace=True)` (bound as `with model.edit(inplace=True) as tracer:`) edits
`model` itself. `model.clear_edits()` removes every edit of that wrapper.

Example:
    >>> import torch, nnpatch
    >>> net = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)))
    >>> with net.edit() as (tracer, zeroed):
    ...     zeroed[0].output[:] = 0               # the first layer's output is always zero
    >>> with zeroed.trace(torch.ones(1, 3)):
    ...     out = zeroed.output.save()
    >>> bool(torch.allclose(out, net[1].bias))
    True
    >>> zeroed.clear_edits()
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

from ..errors import NNPatchError
from . import frames, source, tracebacks
from .invoke import Invoke
from .source import InvokeBody


@dataclass
class Edit:
    body: InvokeBody
    bound: dict[str, Any]  # the names the body reads, as they were where the edit was written


def edits_of(model) -> list[Edit]:
    return model.__dict__.setdefault("_edits", [])


def edited_copy(model):
    """A wrapper of the same torch module with its own list of edits."""
    copy = object.__new__(type(model))
    copy.__dict__.update(model.__dict__)
    copy.__dict__["_edits"] = list(edits_of(model))
    copy.__dict__["_children"] = {}  # its envoys are rooted at the copy
    object.__setattr__(copy, "_root", copy)
    return copy


class EditTracer:
    """The object of `with model.edit():` (see the module docstring)."""

    def __init__(self, model, inplace: bool):
        self.model, self.inplace = model, inplace

    # An edit's body runs later, inside each trace or generation of the edited model: its
    # `tracer.iter[...]` / `tracer.all()` step loops are that generation's.
    @property
    def iter(self):
        """`tracer.iter[...]` of the generation this edit runs in (`for step in tracer.iter[1:]:`)."""
        return self._running().iter

    def all(self):
        """`tracer.all()` of the generation this edit runs in: the edit acts at every step."""
        return self._running().all()

    def _running(self):
        from .invoke import current_invoke
        inv = current_invoke()
        if inv is None or not inv.default:
            raise NNPatchError("tracer.iter / tracer.all() of an edit loop over the steps of the "
                               "generation the edit runs in; use them inside the edit's body")
        return inv.tracer

    def __enter__(self):
        __tracebackhide__ = True  # noqa: F841
        tracebacks.install()
        frame = sys._getframe(1)
        self._frame = frame
        try:
            self._program = source.trace_program(frame, implicit_invoke=True)
        except NNPatchError as e:
            raise type(e)(str(e)) from None
        if self._program.leaves:
            raise NNPatchError(
                f"{frame.f_code.co_filename}:{min(self._program.leaves)}: an edit's body is kept "
                "and runs with every later trace, so `return`, `break` or `continue` cannot leave "
                "it; write them after the with-block")
        self.edited = self.model if self.inplace else edited_copy(self.model)
        self._previous_tracer = source.skip_body(frame)
        return self if self.inplace else (self, self.edited)

    def __exit__(self, exc_type, exc, tb):
        __tracebackhide__ = True  # noqa: F841
        frame = self._frame
        frames.restore_tracing(frame, self._previous_tracer)
        del self._frame
        if exc_type is not source.Skip:
            if exc_type is None:
                raise NNPatchError("nnpatch could not take over this edit's body; put the body "
                                   "on its own lines below the with-statement")
            return False
        program = self._program
        targets = dict(zip(program.target_names, (self,) if self.inplace else (self, self.edited)))
        if len(program.target_names) == 1 and not self.inplace:
            targets = {program.target_names[0]: (self, self.edited)}
        body = program.invokes[0]
        scope = {**frame.f_globals, **(frame.f_locals if frame.f_locals is not frame.f_globals else {}),
                 **targets}
        bound = {n: scope[n] for n in body.reads if n in scope}
        edits_of(self.edited).append(Edit(body, bound))
        frames.write_back(frame, targets, program.globals)
        return True


class _DefaultInvoke(Invoke):
    """An edit replayed in a forward pass: promptless, first at every module, and reading no
    other invoke's variables."""

    default = True

    def producer_of(self, name: str):
        return None


def default_invokes(tracer) -> list[Invoke]:
    """Fresh invokes for the edits of the traced model, for one forward pass."""
    edits = edits_of(tracer.model) if "_edits" in tracer.model.__dict__ else ()
    spec = types.SimpleNamespace(args=(), kwargs={})
    out = []
    for i, edit in enumerate(edits):
        inv = _DefaultInvoke(tracer, edit.body, spec, i - len(edits))
        inv.bound = dict(edit.bound)
        out.append(inv)
    return out


tracebacks.HIDDEN.update({EditTracer.__enter__.__code__, EditTracer.__exit__.__code__})
