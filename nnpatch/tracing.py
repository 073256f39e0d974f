"""Traces: several invokes, one batched forward pass, synchronized without barriers.

Reading top-down: `Tracer` takes over the with-block, `Invoke` is one prompt's program running as
a greenlet, `InvokeNamespace` is where its variables live and where a read of another invoke's
variable waits, and `_Pass` is one batched forward pass that hands module values to the invokes
at the moments the model computes them.

How synchronization works. Each invoke runs until it reads a module value the model has not
computed yet, or a variable that another invoke assigns and has not assigned yet; then it
pauses. When the forward pass reaches a module, the invokes waiting for it resume in source order,
and an invoke whose variable another one waits for wakes that one up, all before the module's
value flows on. So a patch can be written in any invoke order, with no barriers. When one pass
cannot satisfy a dependency (invoke B edits layer 0 with a value invoke A reads at layer 10), B
is run again in a further pass, from its start, once A's values exist.
"""
from __future__ import annotations

import sys
import types
from collections import defaultdict
from typing import Any

import greenlet
import torch

from . import _source
from ._hooks import attach
from ._source import compile_source  # noqa: F401 - public: traces in exec'd strings
from .batching import Rows, map_tensors
from .errors import NNPatchError

Event = tuple[str, str]  # (module path, "input" | "output")


class Tracer:
    """The object bound by `with model.trace(...) as tracer:`.

    Example:
        >>> import torch, nnpatch
        >>> net = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)))
        >>> with net.trace() as tracer:
        ...     with tracer.invoke(torch.ones(1, 3)):
        ...         a = net[0].output
        ...     with tracer.invoke(torch.zeros(1, 3)):
        ...         net[0].output = a              # patch invoke 1's value into invoke 2
        ...         b = net.output
        >>> bool(torch.allclose(b, net(torch.ones(1, 3))))
        True
    """

    def __init__(self, model, inputs: tuple, kwargs: dict):
        self.model = model
        self._inputs = (inputs, kwargs) if (inputs or kwargs) else None
        self._pending: list[Invoke] = []
        self._invokes: list[Invoke] = []
        self._backwards: list = []
        self._program = None

    # -- the with-block ---------------------------------------------------------------------------
    def __enter__(self):
        __tracebackhide__ = True  # noqa: F841 - IPython and pytest leave this frame out
        frame = sys._getframe(1)
        self._frame = frame
        try:
            self._program = _source.trace_program(frame, implicit_invoke=self._inputs is not None)
        except NNPatchError as e:
            raise NNPatchError(str(e)) from None
        self._previous_tracer = _source.skip_body(frame)
        return self

    def __exit__(self, exc_type, exc, tb):
        __tracebackhide__ = True  # noqa: F841 - IPython and pytest leave this frame out
        frame = self._frame
        _source.restore_tracing(frame, self._previous_tracer)
        del self._frame
        if exc_type is not _source._Skip:
            if exc_type is None:
                raise NNPatchError("nnpatch could not take over this trace's body; put the body "
                                   "on its own lines below the with-statement")
            return False
        namespace = self._outer_namespace = TraceNamespace(self, frame)
        try:
            exec(self._program.code, namespace, namespace)
        except BaseException as e:  # noqa: BLE001 - re-raised with the user's frames only
            _drop_context(e)
            raise e.with_traceback(_user_frames(e.__traceback__, frame.f_code.co_filename))
        finally:
            self._pending.clear()
        _write_back(frame, namespace.assigned())
        return True

    # -- the public surface ---------------------------------------------------------------------
    def invoke(self, *inputs: Any, **kwargs: Any) -> "InvokeInputs":
        """One prompt (or batch of prompts) of this trace. Use as `with tracer.invoke(x):`."""
        return InvokeInputs(inputs, kwargs)

    def barrier(self, n: int = 0) -> "_Barrier":
        """Accepted for nnsight compatibility; nnpatch synchronizes invokes by itself."""
        return _Barrier()

    # -- called by the compiled trace body -----------------------------------------------------
    def _invoke(self, spec: "InvokeInputs | None", index: int, binding: str | None) -> "Invoke":
        program = self._program
        if spec is None:
            spec = InvokeInputs(*self._inputs)
        if not isinstance(spec, InvokeInputs):
            raise NNPatchError("`with x.invoke(...)` inside a trace must call the tracer's invoke()")
        inv = Invoke(self, program.invokes[index], spec, len(self._invokes))
        self._pending.append(inv)
        self._invokes.append(inv)
        return inv

    def _flush_if_needed(self, names: tuple[str, ...]) -> None:
        if any(n in inv.body.stores for inv in self._pending for n in names):
            self._flush()

    def _flush(self) -> None:
        """Run the pending invokes: one batched forward pass, and more if dependencies need it."""
        group, self._pending = self._pending, []
        todo = list(group)
        while todo:
            finished_before = sum(inv.done for inv in group)
            _Pass(self, group, todo).run()
            deferred = [inv for inv in todo if inv.deferred]
            if deferred and sum(inv.done for inv in group) == finished_before:
                raise _deadlock_error(deferred)
            for inv in deferred:
                inv.reset()
            todo = deferred
        for inv in group:  # later invokes win, as if the blocks had run one after another
            dict.update(self._outer_namespace, inv.namespace.own())


class InvokeInputs:
    """The inputs of one invoke, as given to `tracer.invoke(...)`."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs

    def __enter__(self):
        raise NNPatchError(
            "`with tracer.invoke(...)` blocks must be written directly in the trace body (not "
            "inside a function called from it), so that nnpatch can batch them")

    def __exit__(self, *exc):
        return False


class _Barrier:
    def __call__(self, *args, **kwargs):
        return None


# -- variables ------------------------------------------------------------------------------------

class TraceNamespace(dict):
    """Variables of the trace body: its own assignments over the caller's locals and globals.

    Used as both globals and locals of the compiled body, so that nested functions and
    comprehensions see the trace's names too.
    """

    def __init__(self, tracer: Tracer, frame: types.FrameType):
        super().__init__()
        self._tracer = tracer
        self._locals = dict(frame.f_locals) if frame.f_locals is not frame.f_globals else {}
        self._globals = frame.f_globals
        self._helpers = _helpers(tracer)
        dict.__setitem__(self, "__builtins__", frame.f_builtins)

    def __getitem__(self, name):
        helper = self._helpers.get(name)
        if helper is not None:
            return helper
        return self.lookup(name)

    def lookup(self, name):
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        if name in self._locals:
            return self._locals[name]
        return self._globals[name]  # KeyError lets Python try builtins, then raise NameError

    def assigned(self) -> dict:
        return {k: v for k, v in self.items() if k != "__builtins__"}


class InvokeNamespace(dict):
    """Variables of one invoke. Reading a name that another invoke assigns waits for it."""

    def __init__(self, inv: "Invoke", outer: TraceNamespace):
        super().__init__()
        self._invoke = inv
        self._outer = outer
        dict.__setitem__(self, "__builtins__", dict.__getitem__(outer, "__builtins__"))

    def __getitem__(self, name):
        helper = self._outer._helpers.get(name)
        if helper is not None:
            return helper
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        producer = self._invoke.producer_of(name)
        if producer is not None:
            value = producer.wait_for_name(self._invoke, name)
            if value is not _MISSING:
                return value
        return self._outer.lookup(name)

    def __setitem__(self, name, value):
        dict.__setitem__(self, name, value)
        self._invoke.stored(name)

    def own(self) -> dict:
        return {k: v for k, v in self.items() if k != "__builtins__"}


_MISSING = object()


# -- invokes --------------------------------------------------------------------------------------

class Invoke:
    """One invoke's program, run as a greenlet alongside the forward pass."""

    def __init__(self, tracer: Tracer, body: _source.InvokeBody, spec: InvokeInputs, index: int):
        self.tracer, self.body, self.spec, self.index = tracer, body, spec, index
        self.outer = None
        self.reset()

    def reset(self) -> None:
        self.namespace: InvokeNamespace | None = None
        self.greenlet: greenlet.greenlet | None = None
        self.done = False
        self.deferred = False
        self.waiting: Event | tuple | None = None  # what it paused for
        self.cache: dict[Event, Any] = {}  # values handed out in this pass
        self.last_event: Event | None = None
        self.waited_across = False  # paused for another invoke's variable in this pass
        self.backward = None  # the gradient context of its latest backward
        self.pass_: _Pass | None = None
        self.rows: Rows | None = None

    # -- life in a pass --------------------------------------------------------------------------
    def start(self, pass_: "_Pass", rows: Rows, outer: TraceNamespace) -> None:
        self.pass_, self.rows = pass_, rows
        if self.namespace is None:
            self.namespace = InvokeNamespace(self, outer)
        self.greenlet = _InvokeGreenlet(self._run)
        self.greenlet.invoke = self
        self.resume()

    def _run(self):
        exec(self.body.code, self.namespace, self.namespace)
        self.done = True
        self.waiting = None
        self.pass_.finished(self)

    def resume(self) -> None:
        self.waiting = None
        self.greenlet.switch()

    def pause(self, waiting) -> None:
        self.waiting = waiting
        self.greenlet.parent.switch()

    # -- module values ---------------------------------------------------------------------------
    def value(self, event: Event):
        """This invoke's view of a module value, waiting for the forward pass to reach it."""
        if event in self.cache:
            return self.cache[event]
        p = self.pass_
        if p.current != event:
            if event in p.fired:
                if self.backward is None:
                    raise _out_of_order(event, self.last_event)
            else:
                p.wait_event(self, event)
                self.pause(event)
        view = p.view(self, event)
        self.cache[event] = view
        self.last_event = event
        return view

    def value_of(self, other: "Invoke", event: Event):
        """Another invoke's rows of a module value, read from this invoke."""
        if other not in self.pass_.rows:
            raise NNPatchError(
                f"invoke {other.index} is not part of this forward pass, so its {_name(event)} "
                "cannot be read here; read it inside that invoke and assign it to a variable")
        p = self.pass_
        if p.current != event:
            if event in p.fired:
                raise _out_of_order(event, self.last_event)
            p.wait_event(self, event)
            self.pause(event)
        self.last_event = event
        return p.view(other, event)

    def set_value(self, event: Event, value) -> None:
        current = self.value(event)
        if self.pass_.current != event:
            raise NNPatchError(
                f"{_name(event)} can only be set while the model computes it, but this invoke "
                f"is already at {_name(self.last_event)}; set it before reading later modules")
        if value is current:
            return
        self.pass_.write(self, event, current, value)

    # -- variables of other invokes --------------------------------------------------------------
    def producer_of(self, name: str) -> "Invoke | None":
        """The invoke whose assignment of `name` this one reads: the nearest earlier one, else
        the nearest later one (so a consumer may be written before its producer)."""
        group = self.pass_.group if self.pass_ else []
        before = [i for i in group if i.index < self.index and name in i.body.stores]
        if before:
            return before[-1]
        after = [i for i in group if i.index > self.index and name in i.body.stores]
        return after[0] if after else None

    def wait_for_name(self, reader: "Invoke", name: str):
        while True:
            ns = self.namespace
            if ns is not None and dict.__contains__(ns, name):
                return dict.__getitem__(ns, name)
            if self.done or self not in reader.pass_.invokes:
                return _MISSING
            reader.waited_across = True
            reader.pass_.wait_name(reader, self, name)
            reader.pause((self, name))

    def stored(self, name: str) -> None:
        if self.pass_ is not None:
            self.pass_.wake(self, name)


class _InvokeGreenlet(greenlet.greenlet):
    invoke: Invoke


def current_invoke() -> Invoke | None:
    g = greenlet.getcurrent()
    return g.invoke if isinstance(g, _InvokeGreenlet) else None


# -- one batched forward pass ---------------------------------------------------------------------

class _Pass:
    def __init__(self, tracer: Tracer, group: list[Invoke], invokes: list[Invoke]):
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

    def _outer(self) -> TraceNamespace:
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
                    f"{_name(inv.waiting)} was not read during the forward pass, so the backward "
                    f"pass has no gradient for it: read it (e.g. `h = {_name(inv.waiting)}`) "
                    "before calling backward(), then use h.grad")
            if paused_for_module and not inv.waited_across:
                raise _out_of_order(inv.waiting, inv.last_event)
            self._defer(inv)
        for inv in self.invokes:
            if inv.done:
                inv.pass_ = None

    # -- hooks -----------------------------------------------------------------------------------
    def _input_hook(self, event: Event):
        def hook(module, args, kwargs):
            if not self.waiting.get(event):
                return None
            new_args = tuple(_fresh(a, self.grad) if i == 0 else a for i, a in enumerate(args))
            if not new_args and kwargs:
                key = next(iter(kwargs))
                kwargs = {**kwargs, key: _fresh(kwargs[key], self.grad)}
            args, kwargs = self._dispatch(event, (new_args, kwargs))
            return args, kwargs
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
        _copy_into(current, new, _name(event))


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


def _name(event: Event | None) -> str:
    if event is None:
        return "the start of the invoke"
    path, kind = event
    return f"{path or 'model'}.{kind}" if path else f"model.{kind}"


def _out_of_order(event: Event, before: Event | None) -> NNPatchError:
    if before is None:
        return NNPatchError(
            f"{_name(event)} was never computed during the forward pass: the model does not call "
            "that module for these inputs, or it runs before a value this invoke read first")
    return NNPatchError(
        f"{_name(event)} was read after {_name(before)}, but the model computes it earlier, so "
        f"the forward pass had already gone past it. Read modules in the order the model runs "
        f"them ({_name(event)} before {_name(before)}), or read it in a separate trace")


def _deadlock_error(deferred: list[Invoke]) -> NNPatchError:
    parts = []
    for inv in deferred:
        parts.append(f"invoke {inv.index} (at {_name(inv.last_event)})")
    return NNPatchError(
        "these invokes wait for each other's variables and no forward pass can satisfy them: "
        + ", ".join(parts) + ". Make sure every variable one invoke reads from another is assigned "
        "by a module the producer reaches, and that two invokes do not each need the other's "
        "later value")


# -- helpers visible to the compiled code -----------------------------------------------------------

def _helpers(tracer: Tracer) -> dict:
    from . import gradients
    return {
        _source.TRACER: tracer,
        _source.SAVE: _save,
        _source.BACKWARD: gradients.backward,
        _source.GET_GRAD: gradients.get_grad,
        _source.SET_GRAD: gradients.set_grad,
    }


def _save(value):
    """`.save()` inside a trace: every value survives the trace anyway; this returns it."""
    return value


# -- leaving the trace ------------------------------------------------------------------------------

def _write_back(frame: types.FrameType, names: dict) -> None:
    """Make the trace body's assignments visible after the with-block, as for any block."""
    if not names:
        return
    if not frame.f_code.co_flags & 0x1:  # not a function (CO_OPTIMIZED): a module or class body
        frame.f_locals.update(names)
        return
    if sys.version_info >= (3, 13):
        proxy = frame.f_locals
        for k, v in names.items():
            proxy[k] = v
        return
    import ctypes
    frame.f_locals.update(names)
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


def _drop_context(e: BaseException) -> None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e.__context__, _source._Skip):
            e.__context__ = None
        e = e.__cause__ or e.__context__


_ENGINE_DIR = __file__.rsplit("/", 1)[0]


def _without_exit_frames(tb):
    """`tb` without the frames of `Tracer.__enter__` and `__exit__`, which raise the errors found
    in the trace's source and re-raise the errors of its body."""
    hidden = (Tracer.__enter__.__code__, Tracer.__exit__.__code__)
    return _chain([entry for entry in _entries(tb) if entry.tb_frame.f_code not in hidden])


class _ExceptHook:
    """Uncaught errors of a script's trace body show the script's lines only.

    Wraps whatever `sys.excepthook` was, and changes nothing but the one frame of the engine's
    that such errors pass through (IPython and pytest skip it by `__tracebackhide__`).
    """

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, exc_type, exc, tb):
        tb = _without_exit_frames(tb)
        if isinstance(exc, BaseException):
            exc.__traceback__ = tb  # the default hook prints the exception's own traceback
        self.previous(exc_type, exc, tb)


if not isinstance(sys.excepthook, _ExceptHook):
    sys.excepthook = _ExceptHook(sys.excepthook)


def _user_frames(tb, user_file: str):
    """The traceback without nnpatch's frames and the model plumbing they call."""
    kept = []
    in_engine = False
    for entry in _entries(tb):
        filename = entry.tb_frame.f_code.co_filename
        if filename == user_file:
            in_engine = False
            kept.append(entry)
        elif filename.startswith(_ENGINE_DIR) or "greenlet" in filename:
            in_engine = True
        elif not in_engine:
            kept.append(entry)
    return _chain(kept)


def _entries(tb) -> list:
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    return entries


def _chain(entries: list):
    """A new traceback through `entries`, outermost first."""
    result = None
    for entry in reversed(entries):
        result = types.TracebackType(result, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return result
