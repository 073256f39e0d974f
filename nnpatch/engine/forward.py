"""One batched forward pass of a trace: hooks hand module values to the invokes at the moments the
model computes them, and write the invokes' edits back.

A `ForwardPass` batches its invokes' inputs, starts each invoke, and runs the model. A hook is
registered only on the modules some invoke waits for; when the model reaches one, the invokes
waiting there resume in source order (each sees only its own rows) before the value flows on.
Every hook is removed in a `finally`.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import greenlet
import torch

from ..errors import NNPatchError
from .batching import Rows, map_tensors
from .hooks import attach
from .inputs import input_slot, read_input, with_input
from .invoke import Event, Invoke, event_name, out_of_order


class ForwardPass:
    def __init__(self, tracer, group: list[Invoke], invokes: list[Invoke]):
        self.tracer, self.group, self.invokes = tracer, group, invokes
        self.model = tracer.model
        self.batch = self.model._prepare([(inv.spec.args, inv.spec.kwargs) for inv in invokes])
        # Known before any invoke starts, so one invoke can read a later one's rows (model.of).
        self.rows: dict[Invoke, Rows] = dict(zip(invokes, self.batch.rows))
        self.waiting: dict[Event, list[Invoke]] = defaultdict(list)
        self.name_waiting: dict[tuple[int, str], list[Invoke]] = defaultdict(list)
        self.ready: list[Invoke] = []
        self.handles: dict[Event, Any] = {}
        self.sentinels: dict[str, Any] = {}
        self.fired: dict[Event, Any] = {}  # batched values handed out, by event
        self.current: Event | None = None
        self.grad = tracer._program.uses_grad

    def run(self) -> None:
        outer = self._outer()
        try:
            with torch.enable_grad() if self.grad else torch.no_grad():
                for inv, rows in self.rows.items():
                    inv.start(self, rows, outer)
                    self._drain()
                if any(not inv.done for inv in self.invokes):
                    self.output = self.model._forward(self.batch)
                self._drain()
        finally:
            for h in reversed([*self.sentinels.values(), *self.handles.values()]):
                h.remove()
            self.handles.clear()
            self.sentinels.clear()
        self._finish()

    def _outer(self):
        return self.tracer._outer_namespace

    # -- scheduling ------------------------------------------------------------------------------
    def wait_event(self, inv: Invoke, event: Event) -> None:
        self.waiting[event].append(inv)
        if event not in self.handles:
            path, kind = event
            module = self.model._resolve(path)
            hook = self._input_hook(event) if kind == "input" else self._output_hook(event)
            self.handles[event] = attach(module, kind, hook)
            self._sentinels(path)

    def _sentinels(self, path: str) -> None:
        """A no-op hook on every ancestor of a hooked module. PyTorch decides when a module's
        call starts whether to look for hooks at all; with a sentinel in place, an ancestor's
        output can still be asked for while its children run."""
        while path:
            path = path.rpartition(".")[0]
            if path in self.sentinels:
                return  # its ancestors got theirs with it
            self.sentinels[path] = self.model._resolve(path).register_forward_pre_hook(_no_op)

    def wait_name(self, reader: Invoke, producer: Invoke, name: str) -> None:
        self.name_waiting[(producer.index, name)].append(reader)

    def wake(self, producer: Invoke, name: str) -> None:
        self.ready.extend(self.name_waiting.pop((producer.index, name), ()))

    def finished(self, inv: Invoke) -> None:
        for key in [k for k in self.name_waiting if k[0] == inv.index]:
            self.ready.extend(self.name_waiting.pop(key))

    def _drain(self, queue: list[Invoke] | None = None) -> None:
        queue = list(queue or ())
        while queue or self.ready:
            queue.extend(self.ready)
            self.ready.clear()
            queue.sort(key=lambda i: i.index)
            inv = queue.pop(0)
            if not inv.done and not inv.deferred:
                inv.resume()

    def _dispatch(self, event: Event, value):
        self.current = event
        self.fired[event] = value
        try:
            self._drain(self.waiting.pop(event, []))
        finally:
            self.current = None
        # An invoke still paused for another invoke's variable has taken module values it may go
        # on to edit; those values flow on now, so it must run again in a later pass.
        for waiters in list(self.name_waiting.values()):
            for inv in waiters:
                if inv.cache and not inv.deferred:
                    self._defer(inv)
        return self.fired[event]

    def _defer(self, inv: Invoke) -> None:
        inv.deferred = True
        for waiters in self.waiting.values():
            if inv in waiters:
                waiters.remove(inv)
        for waiters in self.name_waiting.values():
            if inv in waiters:
                waiters.remove(inv)
        inv.greenlet.throw(greenlet.GreenletExit)

    def _finish(self) -> None:
        """After the forward pass: invokes still paused for a variable, or for a module they
        asked for after pausing for a variable, run again in the next pass; an invoke paused
        for a module that never came read modules out of order."""
        self.ready.clear()
        for inv in self.invokes:
            if inv.done or inv.deferred:
                continue
            paused_for_module = isinstance(inv.waiting[0], str)
            if paused_for_module and inv.backward is not None:
                raise NNPatchError(
                    f"{event_name(inv.waiting)} was not read during the forward pass, so the backward "
                    f"pass has no gradient for it: read it (e.g. `h = {event_name(inv.waiting)}`) "
                    "before calling backward(), then use h.grad")
            if paused_for_module and not inv.waited_across:
                raise out_of_order(inv.waiting, inv.last_event)
            self._defer(inv)
        for inv in self.invokes:
            if inv.done:
                inv.pass_ = None

    # -- hooks -----------------------------------------------------------------------------------
    def _input_hook(self, event: Event):
        def hook(module, args, kwargs):
            if not self.waiting.get(event):
                return None
            slot = input_slot(args, kwargs)
            if slot is not None:  # the input an invoke may edit gets a private copy
                args, kwargs = with_input(args, kwargs, slot, _fresh(read_input(args, kwargs, slot), self.grad))
            return self._dispatch(event, (args, kwargs))
        return hook

    def _output_hook(self, event: Event):
        def hook(module, args, kwargs, output):
            if not self.waiting.get(event):
                return None
            return self._dispatch(event, map_tensors(lambda t: _fresh(t, self.grad), output))
        return hook

    # -- what an invoke sees ---------------------------------------------------------------------
    def view(self, inv: Invoke, event: Event):
        value = self.fired[event]
        rows = self.rows[inv]
        narrow = lambda t: rows.narrow(t, self.batch.size)  # noqa: E731
        if event[1] == "input":
            args, kwargs = value
            return map_tensors(narrow, (args, kwargs))
        return map_tensors(narrow, value)

    def write(self, inv: Invoke, event: Event, current, new) -> None:
        """Write `new` into this invoke's rows of the batched value at `event`."""
        _copy_into(current, new, event_name(event))


def _no_op(module, args):
    return None


def _fresh(t, grad: bool):
    """A private copy of a module value, so that edits never reach tensors the model shares."""
    if not isinstance(t, torch.Tensor):
        return t
    t = t.clone(memory_format=torch.contiguous_format)
    if grad and t.is_floating_point() and not t.requires_grad:
        t = t.requires_grad_(True).clone()  # a non-leaf, so that in-place edits stay legal
    return t


def _copy_into(current, new, where: str) -> None:
    if isinstance(current, torch.Tensor):
        if not isinstance(new, torch.Tensor):
            new = torch.as_tensor(new, dtype=current.dtype, device=current.device)
        try:
            ok = torch.broadcast_shapes(new.shape, current.shape) == current.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise NNPatchError(
                f"cannot set {where}: it has shape {tuple(current.shape)} in this invoke, the new "
                f"value has shape {tuple(new.shape)}; give a tensor of shape {tuple(current.shape)} "
                "(or one that broadcasts to it)")
        current.copy_(new.to(device=current.device, dtype=current.dtype))
        return
    if isinstance(current, (tuple, list)):
        if not isinstance(new, (tuple, list)) or len(new) != len(current):
            raise NNPatchError(
                f"cannot set {where}: it is a {type(current).__name__} of {len(current)} values; "
                f"assign one of the same length, or edit an element in place "
                f"(e.g. {where}[0][:] = value)")
        for c, n in zip(current, new):
            if c is not n:
                _copy_into(c, n, where)
        return
    if isinstance(current, dict) and isinstance(new, dict) and current.keys() == new.keys():
        for k in current:
            if current[k] is not new[k]:
                _copy_into(current[k], new[k], where)
        return
    if current is not new and current != new:
        raise NNPatchError(f"cannot set {where}: only tensor values can be replaced")
