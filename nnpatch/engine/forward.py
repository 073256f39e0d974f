"""One batched forward pass of a trace: hooks hand module values to the invokes at the moments the
model computes them, and write the invokes' edits back.

A `ForwardPass` batches its invokes' inputs, starts each invoke, and runs the model. A hook is
registered only on the modules some invoke waits for; when the model reaches one, the invokes
waiting there resume in source order (each sees only its own rows) before the value flows on.
Every hook is removed in a `finally`.
"""
from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Any

import torch

from ..errors import NNPatchError, NNPatchTypeError, NNPatchValueError
from . import module_source, skip
from .batching import Rows, map_tensors
from .hooks import attach, remove_all
from .inputs import input_slot, read_input, with_input
from .invoke import Event, Invoke, event_name, out_of_order, torch_state
from .scan import prepare_scan, scan_mode
from .unshared import unshared
from .stopping import EndForward


class ForwardPass:
    def __init__(self, tracer, group: list[Invoke], invokes: list[Invoke]):
        self.tracer, self.group, self.invokes = tracer, group, invokes
        self.model = tracer.model
        # A promptless invoke (`tracer.invoke()`) acts on every row of the batch.
        given = [inv for inv in invokes if inv.spec.args or inv.spec.kwargs]
        if not given:
            raise NNPatchTypeError("every invoke of this forward pass is promptless (`tracer.invoke()`); "
                               "a promptless invoke acts on the other invokes' rows, so give at "
                               "least one invoke inputs")
        self.batch = self.model._prepare([(inv.spec.args, inv.spec.kwargs) for inv in given])
        prepare_scan(tracer, self.batch)
        # Known before any invoke starts, so one invoke can read a later one's rows (model.of).
        own = dict(zip(given, self.batch.rows))
        self.rows: dict[Invoke, Rows] = {inv: own.get(inv) or Rows(0, self.batch.size) for inv in invokes}
        self.thread = threading.get_ident()
        self.many = len(group) > 1
        # With several invokes, each gets its rows of a module value as a tensor of its own (a
        # block), and the blocks are joined when the value flows on. An invoke writing another
        # invoke's value into its rows then edits only its own block, so the gradient of the
        # value it copied still reaches that value. A promptless invoke sees every row: the batch
        # stays one tensor.
        self.split = self.many and len(given) == len(invokes)
        # Invokes that own the whole batch, unpadded (one invoke, or a promptless one): their
        # view of a batched tensor is that tensor.
        self.whole = set() if self.split else {
            inv for inv, r in self.rows.items() if r.start == 0 and r.stop == self.batch.size and not r.pad}
        self.blocks: dict[Event, dict[Invoke, list]] = {}
        self.aside_depth = 0  # > 0 while a module is called aside from the trace
        self.waiting: dict[Event, list[Invoke]] = defaultdict(list)
        self.name_waiting: dict[tuple[int, str], list[Invoke]] = defaultdict(list)
        self.replays: dict[Event, list[tuple[Invoke, Any]]] = defaultdict(list)
        self.ready: list[Invoke] = []
        self.handles: dict[Event, Any] = {}
        self.sentinels: dict[str, Any] = {}
        self.fired: dict[Event, Any] = {}  # batched values handed out, by event
        self.flow_versions: dict[Event, tuple] = {}  # their tensors' versions when they flowed on
        self.current: Event | None = None
        self.ticks = 0  # events dispatched so far
        self.resumes = 0  # times an invoke ran (progress, for deadlock detection)
        self.stop_requested = False  # an invoke called tracer.stop()
        self.recorders: dict[Event, list] = defaultdict(list)  # tracer.cache(): fn(pass, event)
        self.skips: dict[str, list] = {}  # module path -> [(invoke, value)] (module.skip)
        self.gates: dict[str, Any] = {}  # module path -> how to restore its forward (skip, .source)
        self.recorded_outputs: dict[int, str] = {}  # id(module) -> path, for the global output hook
        self.global_hook = None
        # The trace's grad mode is the caller's; values are made differentiable when the body
        # asks for gradients, even of a model whose parameters do not require them.
        self.torch_state = torch_state()
        self.grad = tracer._program.uses_grad and torch.is_grad_enabled()

    def run(self) -> None:
        with scan_mode(self.tracer):  # fake tensors for model.scan (engine/scan.py)
            self._run()
        self._finish()

    def _run(self) -> None:
        outer = self._outer()
        try:
            for inv, rows in self.rows.items():
                if inv.greenlet is None:
                    inv.start(self, rows, outer)
                    self._drain()
                else:
                    self._continue(inv, rows)
            self._drain()
            for inv in self.rows:
                for cache in inv.caches:
                    cache.attach(self, inv)
            try:
                self._run_model()
            except EndForward:  # tracer.stop(): no invoke needs the rest of the forward
                pass
            self._drain()
        finally:
            globals_ = [self.global_hook] if self.global_hook is not None else []
            remove_all([*self.gates.values(), *globals_, *self.sentinels.values(), *self.handles.values()])
            self.gates.clear()
            self.global_hook = None
            self.handles.clear()
            self.sentinels.clear()

    def _run_model(self) -> None:
        if any(not inv.done for inv in self.invokes) or self.skips or self.recorders:
            self.output = self.model._forward(self.batch)

    def _outer(self):
        return self.tracer._outer_namespace

    def _continue(self, inv: Invoke, rows: Rows) -> None:
        """Take over an invoke paused in an earlier pass: its rows here get back the values it
        took there (with its edits), and it waits here for what it waited for there."""
        inv.pass_, inv.rows = self, rows
        for event, view in inv.cache.items():
            self.replays[event].append((inv, inv.snapshots.get(event, view)))
            self._hook(event)
        kind = inv.waiting[0]
        if kind == "next":
            inv.stale = False
            self.wait_event(inv, inv.waiting[1])
        elif kind == "name":
            _, producer, name = inv.waiting
            if producer.done or name in producer.final:
                self.ready.append(inv)
            else:
                self.wait_name(inv, producer, name)

    # -- scheduling ------------------------------------------------------------------------------
    def wait_event(self, inv: Invoke, event: Event) -> None:
        self.waiting[event].append(inv)
        self._hook(event)

    def _hook(self, event: Event) -> None:
        if event in self.handles:
            return
        path, kind = event[0], event[1]
        if kind == "output":
            self.handles[event] = attach(self.model._resolve(path), kind, self._output_hook(event))
        elif kind == "input":
            self.handles[event] = attach(self.model._resolve(path), kind, self._input_hook(event))
            skip.install_gate(self, path)  # an invoke that reads a module's input may skip it
        else:  # "source.<operation>.output": a value inside a module's forward (.source)
            module_source.install(self, path, lambda t: _fresh(t, self.grad))
            path += ".source"  # sentinels for the module and its ancestors
        if path.rpartition(".")[0] not in self.sentinels:
            self._sentinels(path)

    def _sentinels(self, path: str) -> None:
        """A no-op hook on every ancestor of a hooked module. PyTorch decides when a module's
        call starts whether to look for hooks at all; with a sentinel in place, an ancestor's
        output can still be asked for while its children run."""
        while path:
            path = path.rpartition(".")[0]
            if path in self.sentinels:
                return  # its ancestors got theirs with it
            self.sentinels[path] = attach(self.model._resolve(path), "input", _no_op)

    def record(self, event: Event, recorder) -> None:
        """Call `recorder(self, event)` each time the model computes `event`, after the invokes
        waiting there (so it sees their edits). Outputs are recorded through one process-wide
        forward hook rather than one hook per module (a cache of every module would otherwise
        register and remove hundreds of hooks per pass); where an invoke waits, the module's own
        hook records after handing the value out."""
        self.recorders[event].append(recorder)
        path, kind = event
        if kind == "input":
            self._hook(event)
            return
        self.recorded_outputs[id(self.model._resolve(path))] = path
        if self.global_hook is None:
            self.global_hook = torch.nn.modules.module.register_module_forward_hook(self._recorded_output)

    def event_now(self, path: str, kind: str) -> Event:
        """The event the model computing `path`.`kind` is, now (a generation adds its step)."""
        return (path, kind)

    def _recorded_output(self, module, args, output):
        path = self.recorded_outputs.get(id(module))
        if path is None:  # another model's module, or one no cache records
            return None
        event = self.event_now(path, "output")
        if not self._ignores(event) and self._recorded_only(event):
            self._record(event, output)
        return None

    def wait_name(self, reader: Invoke, producer: Invoke, name: str) -> None:
        self.name_waiting[(producer.index, name)].append(reader)

    def wake(self, producer: Invoke, name: str) -> None:
        self.ready.extend(self.name_waiting.pop((producer.index, name), ()))

    def finished(self, inv: Invoke) -> None:
        inv.home = self
        for key in [k for k in self.name_waiting if k[0] == inv.index]:
            self.ready.extend(self.name_waiting.pop(key))

    def _drain(self, queue: list[Invoke] | None = None) -> None:
        """Resume the invokes in `queue` and those made ready meanwhile, in source order, until
        none is ready."""
        queue = list(queue or ())
        while queue or self.ready:
            queue.extend(self.ready)
            self.ready.clear()
            if len(queue) > 1:
                queue.sort(key=lambda i: i.index)
            inv = queue.pop(0)
            if not inv.done and inv.greenlet is not None and inv.pass_ is self:
                inv.resume()

    def _dispatch(self, event: Event, value):
        self.current = event
        self.ticks += 1
        self.fired[event] = value
        if self.split:
            self._split(event, value)
        try:
            for inv, content in self.replays.pop(event, ()):
                view = self.view(inv, event)
                _restore(view, content)
                inv.snapshots.setdefault(event, map_tensors(lambda t: t.detach().clone(), content))
            self._drain(self.waiting.pop(event, None))
            if self.recorders:
                for recorder in self.recorders.get(event[:2], ()):  # (path, kind), whatever the step
                    recorder(self, event)
        finally:
            self.current = None
        if self.split:
            self._merge(event)
        if self.stop_requested and all(inv.done or inv.default for inv in self.invokes):
            raise EndForward
        if self.many:  # only an invoke that waits for another one ever asks (pause_across)
            self.flow_versions[event] = _versions(self.handed(event))
        return self.fired[event]

    def _record(self, event: Event, value):
        """An event only caches record (no invoke waits there): the bookkeeping of `_dispatch`
        without handing the value out, so the model's own tensor flows on (the caches copy it)."""
        self.current = event
        self.ticks += 1
        self.fired[event] = value
        try:
            for recorder in self.recorders[event[:2]]:
                recorder(self, event)
        finally:
            self.current = None
        if self.many:
            self.flow_versions[event] = _versions(value)
        if self.stop_requested and all(inv.done or inv.default for inv in self.invokes):
            raise EndForward

    def _recorded_only(self, event: Event) -> bool:
        return event[:2] in self.recorders and not self.waiting.get(event) and event not in self.replays

    def _split(self, event: Event, value) -> None:
        leaves = _flat(value)
        first = next(iter(self.rows.values()))
        self.blocks[event] = {
            inv: [t[rows.start:rows.stop].clone(memory_format=torch.contiguous_format)
                  if first.batched(t, self.batch.size) else t for t in leaves]
            for inv, rows in self.rows.items()}

    def _merge(self, event: Event) -> None:
        """The batched value that flows on: the invokes' blocks, with their edits, joined."""
        blocks = self.blocks[event]
        order = sorted(blocks, key=lambda inv: self.rows[inv].start)
        leaves = _flat(self.fired[event])
        first = self.rows[order[0]]
        merged = [torch.cat([blocks[inv][j] for inv in order]) if first.batched(t, self.batch.size)
                  else t for j, t in enumerate(leaves)]
        self.fired[event] = _rebuild(self.fired[event], merged)

    def handed(self, event: Event) -> list[torch.Tensor]:
        """The tensors that the invokes' views of `event` are views of."""
        if event not in self.blocks:
            return _flat(self.fired[event])
        found = {}
        for leaves in self.blocks[event].values():
            found.update((id(t), t) for t in leaves)
        return list(found.values())

    def handed_values(self) -> list[torch.Tensor]:
        return [t for event in self.fired for t in self.handed(event)]

    def unchanged_since_flow(self, event: Event) -> bool:
        """Whether the batched value of `event` is as it was when it flowed on (no in-place
        edit since; conservative: an edit of any invoke's rows counts)."""
        return event in self.flow_versions and _versions(self.handed(event)) == self.flow_versions[event]

    def _finish(self) -> None:
        """After the forward pass: an invoke paused for a module that never came read modules
        out of order; invokes paused for another invoke go on in the next pass."""
        if not self.stop_requested:
            skip.check_all_used(self)
        self.ready.clear()
        for inv in self.invokes:
            if inv.done:
                continue
            if inv.default and self.stop_requested:  # an edit of modules that tracer.stop() cut off
                inv.close()
                inv.done = True
                continue
            if inv.restart:  # its values before the pause are lost: run it again from the start
                inv.close()
                inv.reset()
                continue
            kind = inv.waiting[0]
            if kind == "maybe":  # asked for after a pause, and the pass had gone past it
                inv.waiting = ("next", inv.waiting[1])
            elif kind == "event":
                event = inv.waiting[1]
                if inv.backward is not None:
                    raise NNPatchError(
                        f"{event_name(event)} was not read during the forward pass, so the backward "
                        f"pass has no gradient for it: read it (e.g. `h = {event_name(event)}`) "
                        "before calling backward(), then use h.grad")
                raise out_of_order(event, inv.last_event)
        for inv in self.invokes:
            if inv.done:
                inv.pass_ = None

    # -- hooks -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def aside(self):
        """Module calls in this block (an invoke calling `model.lm_head(h)`) skip the trace."""
        self.aside_depth += 1
        try:
            yield
        finally:
            self.aside_depth -= 1

    def _ignores(self, event: Event) -> bool:
        """Calls the trace must not see: aside calls, other threads' forwards, and modules no
        invoke waits for here."""
        return (self.aside_depth > 0 or threading.get_ident() != self.thread
                or (not self.waiting.get(event) and event not in self.replays
                    and event[:2] not in self.recorders))

    def _input_hook(self, event: Event):
        def hook(module, args, kwargs):
            if self._ignores(event):
                return None
            if self._recorded_only(event):
                self._record(event, (args, kwargs))
                return None
            slot = input_slot(args, kwargs)
            if slot is not None:  # the input an invoke may edit gets a private copy
                args, kwargs = with_input(args, kwargs, slot, _fresh(read_input(args, kwargs, slot), self.grad))
            return self._dispatch(event, (args, kwargs))
        return hook

    def _output_hook(self, event: Event):
        def hook(module, args, kwargs, output):
            # `_ignores(event) or _recorded_only(event)` in one test: with no invoke waiting and
            # nothing to replay, the call is ignored or only recorded (the global hook records)
            if (self.aside_depth or threading.get_ident() != self.thread
                    or not (self.waiting.get(event) or event in self.replays)):
                return None
            if isinstance(output, torch.Tensor):  # the common case, without a closure
                if not self.grad and unshared(output):  # no copy needed (see unshared)
                    return self._dispatch(event, output)
                return self._dispatch(event, _fresh(output, self.grad))
            return self._dispatch(event, map_tensors(lambda t: _fresh(t, self.grad), output))
        return hook

    # -- what an invoke sees ---------------------------------------------------------------------
    def view(self, inv: Invoke, event: Event):
        value = self.fired[event]
        if inv in self.whole and type(value) is torch.Tensor:
            return value  # what `view_rows` gives an invoke that has every row: the tensor itself
        return self.view_rows(inv, event, self.rows[inv])

    def view_rows(self, inv: Invoke, event: Event, rows: Rows):
        """`inv`'s part of the value at `event`, cut as `rows` says (its own block, when the
        pass gives each invoke one)."""
        value = self.fired[event]
        if event in self.blocks:
            own = [rows.trim(b) if rows.batched(t, self.batch.size) else b
                   for t, b in zip(_flat(value), self.blocks[event][inv])]
            return _rebuild(value, own)
        if isinstance(value, torch.Tensor):
            return rows.narrow(value, self.batch.size)
        return map_tensors(lambda t: rows.narrow(t, self.batch.size), value)

    def write(self, inv: Invoke, event: Event, current, new) -> None:
        """Write `new` into this invoke's rows of the batched value at `event`."""
        _copy_into(current, new, event_name(event))


def _no_op(module, args, kwargs):
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
            raise NNPatchValueError(
                f"cannot set {where}: it has shape {tuple(current.shape)} in this invoke, the new "
                f"value has shape {tuple(new.shape)}; give a tensor of shape {tuple(current.shape)} "
                "(or one that broadcasts to it)")
        current.copy_(new.to(device=current.device, dtype=current.dtype))
        return
    if isinstance(current, (tuple, list)):
        if not isinstance(new, (tuple, list)) or len(new) != len(current):
            raise NNPatchValueError(
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
        raise NNPatchTypeError(f"cannot set {where}: only tensor values can be replaced")


def _restore(view, content) -> None:
    """Copy the tensors of `content` into the matching tensors of `view` (same structure)."""
    if isinstance(view, torch.Tensor):
        if isinstance(content, torch.Tensor) and content is not view:
            with torch.no_grad():
                view.copy_(content)
        return
    if isinstance(view, (tuple, list)) and isinstance(content, (tuple, list)):
        for v, c in zip(view, content):
            _restore(v, c)
    elif isinstance(view, dict) and isinstance(content, dict):
        for k in view.keys() & content.keys():
            _restore(view[k], content[k])


def _flat(value) -> list:
    """The tensors of a (nested) value, in `map_tensors` order."""
    found = []
    map_tensors(lambda t: found.append(t) or t, value)
    return found


def _rebuild(value, tensors: list):
    """`value` with its tensors replaced, in order, by `tensors`."""
    it = iter(tensors)
    return map_tensors(lambda t: next(it), value)


def _versions(value) -> tuple:
    found = []
    map_tensors(lambda t: found.append(_version(t)), value)
    return tuple(found)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be edited)
        return -1
