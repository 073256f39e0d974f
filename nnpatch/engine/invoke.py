"""Invokes: each invoke's program runs as a greenlet that meets the forward pass at the modules
it reads.

An `Invoke` pauses when it reads a module value the model has not computed yet, or a variable
another invoke assigns and has not assigned yet; the forward pass (`forward.ForwardPass`)
resumes it when the value exists. `current_invoke()` is the one place that knows which invoke's
code is running; envoys and gradients ask it.
"""
from __future__ import annotations

from typing import Any

import greenlet

from ..errors import NNPatchError
from .batching import Rows
from .source import InvokeBody

Event = tuple[str, str]  # (module path, "input" | "output")


class Invoke:
    """One invoke's program, run as a greenlet alongside the forward pass."""

    def __init__(self, tracer, body: InvokeBody, spec, index: int):
        self.tracer, self.body, self.spec, self.index = tracer, body, spec, index
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
        self.pass_ = None  # the ForwardPass it runs in
        self.rows: Rows | None = None

    # -- life in a pass --------------------------------------------------------------------------
    def start(self, pass_, rows: Rows, outer) -> None:
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
                    raise out_of_order(event, self.last_event)
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
                f"invoke {other.index} is not part of this forward pass, so its {event_name(event)} "
                "cannot be read here; read it inside that invoke and assign it to a variable")
        p = self.pass_
        if p.current != event:
            if event in p.fired:
                raise out_of_order(event, self.last_event)
            p.wait_event(self, event)
            self.pause(event)
        self.last_event = event
        return p.view(other, event)

    def set_value(self, event: Event, value) -> None:
        current = self.value(event)
        if self.pass_.current != event:
            raise NNPatchError(
                f"{event_name(event)} can only be set while the model computes it, but this invoke "
                f"is already at {event_name(self.last_event)}; set it before reading later modules")
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


class InvokeNamespace(dict):
    """Variables of one invoke. Reading a name that another invoke assigns waits for it."""

    def __init__(self, inv: "Invoke", outer):
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


# -- errors ------------------------------------------------------------------------------------------

def event_name(event: Event | None) -> str:
    if event is None:
        return "the start of the invoke"
    path, kind = event
    return f"{path or 'model'}.{kind}" if path else f"model.{kind}"


def out_of_order(event: Event, before: Event | None) -> NNPatchError:
    if before is None:
        return NNPatchError(
            f"{event_name(event)} was never computed during the forward pass: the model does not call "
            "that module for these inputs, or it runs before a value this invoke read first")
    return NNPatchError(
        f"{event_name(event)} was read after {event_name(before)}, but the model computes it earlier, so "
        f"the forward pass had already gone past it. Read modules in the order the model runs "
        f"them ({event_name(event)} before {event_name(before)}), or read it in a separate trace")


def deadlock_error(deferred: list[Invoke]) -> NNPatchError:
    parts = []
    for inv in deferred:
        parts.append(f"invoke {inv.index} (at {event_name(inv.last_event)})")
    return NNPatchError(
        "these invokes wait for each other's variables and no forward pass can satisfy them: "
        + ", ".join(parts) + ". Make sure every variable one invoke reads from another is assigned "
        "by a module the producer reaches, and that two invokes do not each need the other's "
        "later value")
