"""Traces: several invokes, one batched forward pass, synchronized without barriers.

Reading top-down: `Tracer` takes over the with-block and `TraceNamespace` holds the body's
variables; `invoke.Invoke` is one prompt's program running as a greenlet, with an
`InvokeNamespace` where a read of another invoke's variable waits; `forward.ForwardPass` is one
batched forward pass that hands module values to the invokes at the moments the model computes
them.

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
from typing import Any

from ..errors import NNPatchAttributeError, NNPatchError, NNPatchTypeError
from . import frames, gradients, leaving, source, stopping, tracebacks
from .cache import make_cache
from .edit import default_invokes
from .forward import ForwardPass
from .hooks import exclusive
from .invoke import Barrier, Invoke, current_invoke, deadlock_error
from .session import count_trace


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

    def __init__(self, model, inputs: tuple, kwargs: dict, scan: bool = False):
        self.model = model
        self.scan = scan  # shapes only, with fake tensors (engine/scan.py)
        self._inputs = (inputs, kwargs) if (inputs or kwargs) else None
        self._pending: list[Invoke] = []
        self._invokes: list[Invoke] = []
        self._program = None

    # -- the with-block ---------------------------------------------------------------------------
    def __enter__(self):
        __tracebackhide__ = True  # noqa: F841 - IPython and pytest leave this frame out
        tracebacks.install()
        frame = sys._getframe(1)
        try:
            self._program = source.trace_program(frame, implicit_invoke=self._inputs is not None)
        except NNPatchError as e:
            raise type(e)(str(e)) from None
        try:
            left_at = self._run_body(frame)
        except BaseException as e:  # noqa: BLE001 - re-raised with the user's frames only
            raise e.with_traceback(tracebacks.user_frames(e.__traceback__, frame.f_code.co_filename))
        if left_at is None:
            self._tracing = frame, source.skip_body(frame)
        else:  # a `return`, `break` or `continue` left the body: Python goes on at that line
            self._tracing = frame, leaving.leave_body(frame, self._program.header_end, left_at)
        self._left = left_at is not None
        return self

    def __exit__(self, exc_type, exc, tb):
        __tracebackhide__ = True  # noqa: F841 - IPython and pytest leave this frame out
        frame, saved = self._tracing
        frames.restore_tracing(frame, saved)
        del self._tracing
        if exc_type is source.Skip:
            return True
        if exc_type is None and not self._left:
            raise NNPatchError("nnpatch could not take over this trace's body; put the body "
                               "on its own lines below the with-statement")
        return False

    def _run_body(self, frame) -> int | None:
        """Run the compiled body with the caller's variables, and write what it assigns back
        into the caller's frame. Returns the line of the `return`, `break` or `continue` that
        left the body, if one did."""
        namespace = self._outer_namespace = TraceNamespace(self, frame)
        if self._program.target:  # `as tracer` is bound only after __enter__ returns
            dict.__setitem__(namespace, self._program.target, self)
        left_at = None
        try:
            exec(self._program.code, namespace, namespace)
        except leaving.Leave as leave:
            left_at = leave.line
        except BaseException:
            for inv in self._invokes:
                inv.close()
            builtins = dict.get(namespace, "__builtins__")
            dict.clear(namespace)  # the traceback keeps the body's frame: let its values go
            dict.__setitem__(namespace, "__builtins__", builtins)
            raise
        finally:
            self._pending.clear()
        frames.write_back(frame, namespace.assigned(), self._program.globals)
        count_trace(self.model)
        if left_at is None:
            left_at = next((inv.left_at for inv in self._invokes if inv.left_at is not None), None)
        self._release()
        return left_at

    def _release(self) -> None:
        """Break the reference cycles between this trace, its namespace and its invokes (see
        `Invoke.release`), so that what the trace computed is freed as soon as the caller lets
        go of it, without waiting for Python's cyclic garbage collector."""
        for inv in self._invokes:
            inv.release()
        self._invokes = []
        self._outer_namespace = None

    # -- the public surface ---------------------------------------------------------------------
    def invoke(self, *inputs: Any, **kwargs: Any) -> "InvokeInputs":
        """One prompt (or batch of prompts) of this trace. Use as `with tracer.invoke(x):`."""
        return InvokeInputs(inputs, kwargs)

    def barrier(self, n: int) -> Barrier:
        """A meeting point of `n` invokes (`barrier = tracer.barrier(2)`, then `barrier()` in
        each): each waits there for the others, and reads what they assigned before it.

        nnpatch synchronizes invokes without barriers (a variable another invoke assigns is read
        once that invoke has assigned it for the last time); a barrier, where one is written,
        says where two invokes meet instead."""
        return Barrier(n)

    def cache(self, modules=None, *, include_inputs: bool = False, include_output: bool = True,
              device="cpu", dtype=None, detach: bool = True):
        """Record this invoke's rows of every module's output (or of `modules`: envoys or paths),
        after the trace's edits; read it after the trace as `cache["transformer.h.0"].output` or
        `cache.transformer.h[0].output`. Call it at the start of an invoke. See `cache.Cache`
        (memory, several calls per module)."""
        return make_cache(self, modules, include_output=include_output, include_inputs=include_inputs,
                          device=device, dtype=dtype, detach=detach)

    def stop(self) -> None:
        """End this invoke's program here, and the forward pass as soon as no invoke needs more
        of it: modules after that point do not run (`stopping`)."""
        inv = current_invoke()
        if inv is None or inv.tracer is not self:
            raise NNPatchError(
                "tracer.stop() ends the forward pass from inside an invoke; call it in a "
                "`with tracer.invoke(...)` block (or the body of `model.trace(input)`) after the "
                "last value that invoke needs")
        if inv.pass_ is not None:
            inv.pass_.stop_requested = True
        raise stopping.Stop

    @property
    def iter(self):
        """Step loops exist only in a generation (`model.generate(...)`)."""
        raise NNPatchAttributeError(  # an AttributeError: hasattr(tracer, "iter") is False
            "tracer.iter selects generation steps, but this trace is one forward pass "
            "(model.trace); open `with model.generate(prompt, max_new_tokens=N) as tracer:` and "
            "loop `for step in tracer.iter[...]:` inside it")

    def all(self):
        """Step loops exist only in a generation (`model.generate(...)`)."""
        raise NNPatchError(
            "tracer.all() loops over generation steps, but this trace is one forward pass "
            "(model.trace); open `with model.generate(prompt, max_new_tokens=N) as tracer:` and "
            "loop `for step in tracer.all():` inside it")

    # -- called by the compiled trace body -----------------------------------------------------
    def _invoke(self, spec: "InvokeInputs | None", index: int) -> Invoke:
        program = self._program
        if spec is None:
            spec = InvokeInputs(*self._inputs)
        if not isinstance(spec, InvokeInputs):
            raise NNPatchTypeError("`with x.invoke(...)` inside a trace must call the tracer's invoke()")
        body = program.invokes[index]
        inv = Invoke(self, body, spec, len(self._invokes))
        # Trace-level names as they are where the invoke is written (a loop variable, a value
        # rebound between invokes): the invoke runs later, with the forward pass.
        outer = self._outer_namespace
        inv.bound = {n: dict.__getitem__(outer, n) for n in body.reads if dict.__contains__(outer, n)}
        self._pending.append(inv)
        self._invokes.append(inv)
        return inv

    def _leave(self, line: int) -> None:
        """A `return`, `break` or `continue` at `line` leaves the body: what it wrote before
        that runs (the pending invokes too); the rest of the body does not."""
        inv = current_invoke()
        if inv is None:  # trace-level code
            self._flush()
            raise leaving.Leave(line)
        inv.left_at = line  # the trace's own invoke (model.trace(input)) ends as at tracer.stop()
        self.stop()

    def _flush_if_needed(self, names: tuple[str, ...]) -> None:
        if any(n in inv.body.stores for inv in self._pending for n in names):
            self._flush()

    def _flush(self) -> None:
        """Run the pending invokes: one batched forward pass, and more if dependencies need it."""
        group, self._pending = self._pending, []
        todo = list(group)
        with exclusive(self.model._module):
            self._run_passes(group, todo)
        for inv in group:  # later invokes win, as if the blocks had run one after another
            dict.update(self._outer_namespace, inv.namespace.own())

    def _run_passes(self, group: list[Invoke], todo: list[Invoke]) -> None:
        try:
            while todo:
                forward = ForwardPass(self, group, default_invokes(self) + todo)
                forward.run()
                todo = [inv for inv in todo if not inv.done]
                if todo and not forward.resumes:
                    raise deadlock_error(todo)
        except BaseException:
            for inv in group:  # paused invokes end here: their finally blocks run, their values go
                inv.close()
            raise


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
        return {k: v for k, v in self.items() if k != "__builtins__" and not k.startswith("__nnpatch_")}


# -- helpers visible to the compiled code -----------------------------------------------------------

def _helpers(tracer: Tracer) -> dict:
    return {
        source.TRACER: tracer,
        source.BACKWARD: gradients.backward,
        source.GET_GRAD: gradients.get_grad,
        source.SET_GRAD: gradients.set_grad,
        source.FINAL: _final,
        leaving.LEAVE: tracer._leave,
    }


def _final(names: tuple[str, ...]) -> None:
    inv = current_invoke()
    if inv is not None:
        inv.finalize(names)


# Uncaught errors of a script's trace body skip these two frames (see tracebacks.install).
tracebacks.HIDDEN.update({Tracer.__enter__.__code__, Tracer.__exit__.__code__})
