"""Invokes: each invoke's program runs as a greenlet that meets the forward pass at the modules
it reads.

An `Invoke` pauses when it reads a module value the model has not computed yet, when it reads a
variable that another invoke has not finished assigning, and at a barrier until every
participant has reached it; the forward pass (`forward.ForwardPass`) resumes it when what it
waits for exists. `current_invoke()` is the one place that knows which invoke's code is running;
envoys and gradients ask it.

Waiting for another invoke stops this invoke's clock: the forward pass may run on meanwhile, but
what this invoke does next happens, for its own rows, at the point where it paused. When the pass
has moved on by the time it is released, its next module read continues in a further forward
pass that replays the values it had already taken (with its edits) and resumes it at the module
it asks for. Its statements run once, in the order written.
"""
from __future__ import annotations

import threading
from typing import Any

import greenlet
import torch

from ..errors import NNPatchError, NNPatchValueError
from .batching import Rows, map_tensors
from .source import InvokeBody
from .stopping import Stop

Event = tuple  # (module path, "input" | "output" | "source.<operation>.output"), and the step in a generation


class Invoke:
    """One invoke's program, run as a greenlet alongside the forward pass."""

    default = False  # an edit of the model (engine/edit.py), replayed in every forward pass

    def __init__(self, tracer, body: InvokeBody, spec, index: int):
        self.tracer, self.body, self.spec, self.index = tracer, body, spec, index
        self.bound: dict[str, Any] = {}  # trace-level names as they were where the invoke is written
        self.steps = None  # in a generation, which step its reads bind to (generation.StepClock)
        self.reset()

    def reset(self) -> None:
        self.namespace: InvokeNamespace | None = None
        self.greenlet: greenlet.greenlet | None = None
        self.done = False
        self.waiting: tuple | None = None  # ("event" | "next", event) | ("name", invoke, name) | ("barrier", b)
        self.cache: dict[Event, Any] = {}  # views handed out, by event (of any pass)
        self.taken_in: dict[Event, Any] = {}  # the pass each view is from
        self.last_event: Event | None = None
        self.final: set[str] = set()  # names this invoke will not assign again
        self.met: dict[int, dict] = {}  # invoke index -> its variables at the last barrier shared with it
        self.backward = None  # the gradient context of its latest backward
        self.pass_ = None  # the ForwardPass it runs in
        self.home = None  # the ForwardPass it finished in
        self.rows: Rows | None = None
        self.torch_state = None  # grad mode and autocast inside this invoke's code
        # Waiting for another invoke stops this invoke's clock at `live` (the event being computed
        # when it paused); `stale` once the pass has gone on, so its next read needs a new pass.
        self.live: Event | None = None
        self.paused_at: int | None = None
        self.stale = False
        self.snapshots: dict[Event, Any] = {}  # content of values taken before the pause
        self.restart = False  # a value it took was edited after it flowed on: run again from the start
        self.caches: list = []  # tracer.cache() objects it declared (recorded in each pass it runs in)
        self.left_at: int | None = None  # the line of a `return`/`break`/`continue` that ended it

    # -- life in a pass --------------------------------------------------------------------------
    def start(self, pass_, rows: Rows, outer) -> None:
        self.pass_, self.rows = pass_, rows
        if self.namespace is None:
            self.namespace = InvokeNamespace(self, outer)
        self.torch_state = pass_.torch_state
        self.greenlet = _worker()
        self.greenlet.invoke = self
        self.resume()

    def _run(self):
        try:
            exec(self.body.code, self.namespace, self.namespace)
        except Stop:  # tracer.stop(): the rest of this invoke's program does not run
            pass
        self.done = True
        self.waiting = None
        self.pass_.finished(self)

    def resume(self) -> None:
        """Run this invoke until it pauses again, with its own grad mode and autocast state."""
        # torch_state(), with its common case (autocast off) written out: this runs at every read
        outer = (_grad_enabled(),) if not _any_autocast() else torch_state()
        mine = self.torch_state
        if mine is not None and mine != outer:
            _set_torch_state(mine, outer)
        self.pass_.resumes += 1
        try:
            self.greenlet.switch()
        finally:
            mine = self.torch_state = (_grad_enabled(),) if not _any_autocast() else torch_state()
            if mine != outer:
                _set_torch_state(outer, mine)

    def pause(self, waiting) -> None:
        self.waiting = waiting
        self.greenlet.parent.switch()
        self.waiting = None

    def pause_across(self, waiting) -> None:
        """Pause for another invoke. Its clock stops here: what it took so far is kept as it is
        now, so that a later pass can put it back."""
        p = self.pass_
        if not self.stale:
            self.live, self.paused_at = p.current, p.ticks
            for event, view in self.cache.items():
                if event != p.current and event not in self.snapshots:
                    if not p.unchanged_since_flow(event):
                        self.restart = True  # edited after it flowed on: its value then is lost
                    self.snapshots[event] = map_tensors(lambda t: t.detach().clone(), view)
        self.pause(waiting)
        if self.pass_ is not p or p.ticks != self.paused_at:
            self.stale = True

    def close(self) -> None:
        """End a paused invoke (its `finally` blocks run) and drop what it holds."""
        g = self.greenlet
        for _ in range(3):  # an invoke that swallows GreenletExit gets it again
            if g is None or g.dead or not g:
                break
            try:
                g.throw(greenlet.GreenletExit)
            except greenlet.GreenletExit:
                break
        if self.namespace is not None:  # nothing is written back from a failed trace
            dict.clear(self.namespace)
        self.release()

    def release(self) -> None:
        """After its trace, or once closed: drop the links from this invoke to the engine's
        objects (its passes, the views it took, its namespace, its greenlet). They form reference
        cycles that would otherwise keep every value the trace computed alive until Python's
        cyclic garbage collector runs. The invoke's variables stay where the trace wrote them
        back, and functions defined in its body still find them (their globals are the namespace)."""
        self.cache, self.taken_in, self.snapshots, self.met = {}, {}, {}, {}
        self.backward = self.pass_ = self.home = self.rows = self.namespace = self.greenlet = None

    # -- module values ---------------------------------------------------------------------------
    def at(self, path: str, kind: str) -> Event:
        """The event a read of `path`.`kind` means now: in a generation, at this invoke's step."""
        return (path, kind) if self.steps is None else self.steps.at(path, kind)

    def value(self, event: Event):
        """This invoke's view of a module value, waiting for the forward pass to reach it."""
        if event in self.cache and not (self.stale and event == self.live):
            return self.cache[event]
        self._reach(event)
        view = self.pass_.view(self, event)
        self.cache[event] = view
        self.taken_in[event] = self.pass_
        self.last_event = event
        return view

    def _reach(self, event: Event) -> None:
        """Pause until the forward pass computes `event` (in a further pass when this invoke's
        clock stopped before the present pass got there)."""
        p = self.pass_
        optimistic = False
        if self.stale:
            if (p.current == event or event not in p.fired) and self._rows_intact():
                # Its rows here are what they would be had it not paused: if the pass has not
                # reached `event` yet, it can be read here; if it has, a further pass serves it.
                self.stale, optimistic = False, True
            else:
                self.pause(("next", event))
                return
        if p.current == event:
            return
        if event in p.fired:
            if self.backward is None:
                raise out_of_order(event, self.last_event)
            return
        p.wait_event(self, event)
        self.pause(("maybe" if optimistic else "event", event))

    def _rows_intact(self) -> bool:
        """Whether every value this invoke took is from this pass and unedited since it flowed
        on: then the forward pass went on for its rows exactly as if it had not paused."""
        p = self.pass_
        return all(self.taken_in.get(e) is p and p.unchanged_since_flow(e) for e in self.cache)

    def value_of(self, other: "Invoke", event: Event):
        """Another invoke's rows of a module value, read from this invoke."""
        home = self.pass_ if other in self.pass_.rows else other.home
        if home is not self.pass_:
            if home is None or event not in home.fired:
                raise NNPatchError(
                    f"invoke {other.index} did not compute {event_name(event)} in a forward pass "
                    "this invoke can see; read it inside that invoke and assign it to a variable")
            return home.view(other, event)
        self._reach(event)
        self.last_event = event
        return self.pass_.view(other, event)

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
        if len(group) < 2:  # alone in its trace: every name it reads is its own or the caller's
            return None
        before = [i for i in group if i.index < self.index and name in i.body.stores]
        if before:
            return before[-1]
        after = [i for i in group if i.index > self.index and name in i.body.stores]
        return after[0] if after else None

    def wait_for_name(self, reader: "Invoke", name: str):
        """`name` as this invoke holds it where the reader meets it: at the last barrier the two
        shared, else once this invoke has assigned it for the last time."""
        while True:
            met = reader.met.get(self.index)
            if met is not None and name in met:
                return met[name]
            if self.done or name in self.final or _step_ahead(self, reader):
                ns = self.namespace
                return dict.__getitem__(ns, name) if ns is not None and dict.__contains__(ns, name) else _MISSING
            reader.pass_.wait_name(reader, self, name)
            reader.pause_across(("name", self, name))

    def finalize(self, names: tuple[str, ...]) -> None:
        """This invoke has passed its last assignment of `names`."""
        self.final.update(names)
        if self.pass_ is not None:
            for name in names:
                self.pass_.wake(self, name)

    def arrive(self, barrier: "Barrier") -> None:
        if self in barrier.arrived:
            raise NNPatchError(f"invoke {self.index} called the same barrier twice before the other "
                               f"{barrier.n - 1} invokes reached it")
        barrier.arrived.append(self)
        if len(barrier.arrived) < barrier.n:
            barrier.waiting.append(self)
            self.pause_across(("barrier", barrier))
            return
        barrier.release()
        if self.pass_ is not None:
            self.pass_.ready.extend(w for w in barrier.released_waiters if w is not self)


class Barrier:
    """`tracer.barrier(n)`: the `n` invokes that call it wait for each other there, and what each
    has assigned by then is what the others read after it."""

    def __init__(self, n: int):
        if not isinstance(n, int) or n < 1:
            raise NNPatchValueError(f"tracer.barrier(n) takes the number of invokes that meet there, got {n!r}")
        self.n = n
        self.arrived: list[Invoke] = []
        self.waiting: list[Invoke] = []
        self.released_waiters: list[Invoke] = []

    def __call__(self) -> None:
        inv = current_invoke()
        if inv is None:
            raise NNPatchError("call a barrier inside the invokes that meet there: "
                               "`with tracer.invoke(...): ...; barrier()`")
        inv.arrive(self)

    def release(self) -> None:
        variables = {inv.index: dict(inv.namespace.own()) for inv in self.arrived}
        for reader in self.arrived:
            for inv in self.arrived:
                if inv is not reader:
                    reader.met[inv.index] = variables[inv.index]
        self.released_waiters, self.waiting, self.arrived = list(self.waiting), [], []

    def __repr__(self) -> str:
        return f"barrier({self.n})"


class _InvokeGreenlet(greenlet.greenlet):
    """Runs invokes' programs, one after another. A greenlet's first run allocates Python's frame
    stack for it (on CPython 3.11+ an mmap and a munmap of 16 KiB per greenlet: some 10 us, more
    amid a forward pass), so a finished invoke's greenlet waits on its thread for the next invoke
    instead of ending. An invoke that raises, or is closed while paused, ends its greenlet, as a
    plain greenlet would: the exception reaches the code that resumed it."""

    invoke: Invoke | None = None

    def run(self):
        while True:
            inv = self.invoke
            inv._run()
            inv.greenlet = self.invoke = inv = None  # hold nothing of it while idle
            idle = _idle_workers()
            if len(idle) >= _MAX_IDLE:
                return
            idle.append(self)
            self.parent.switch()


_IDLE = threading.local()
_MAX_IDLE = 8  # idle greenlets kept per thread (a trace with more invokes makes more)


def _idle_workers() -> list[_InvokeGreenlet]:
    idle = getattr(_IDLE, "workers", None)
    if idle is None:
        idle = _IDLE.workers = []
    return idle


def _worker() -> _InvokeGreenlet:
    """A greenlet for an invoke about to start: an idle one of this thread, or a new one."""
    idle = _idle_workers()
    while idle:
        g = idle.pop()
        if not g.dead:  # a Ctrl-C may have ended it on its way to idle
            g.parent = greenlet.getcurrent()
            g.gr_context = None  # a fresh context, as a new greenlet has
            return g
    return _InvokeGreenlet()


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
        inv = self._invoke
        producer = inv.producer_of(name)
        if producer is not None:
            value = producer.wait_for_name(inv, name)
            if value is not _MISSING:
                return value
        if name in inv.bound:
            return inv.bound[name]
        return self._outer.lookup(name)

    def own(self) -> dict:
        return {k: v for k, v in self.items() if k != "__builtins__" and not k.startswith("__nnpatch_")}


_MISSING = object()


def _step_ahead(producer: Invoke, reader: Invoke) -> bool:
    """In a generation, a producer whose step loop has moved past the reader's step holds the
    value it assigned at that step: the reader takes it then (synchronized per step)."""
    return (producer.steps is not None and reader.steps is not None
            and producer.steps.pinned > reader.steps.pinned)


# -- grad mode and autocast, per invoke -----------------------------------------------------------

_AUTOCAST = tuple(d for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available())


def torch_state() -> tuple:
    """Grad mode and autocast state of this thread (cheap when autocast is off: one call each)."""
    if not _any_autocast():
        return (_grad_enabled(),)
    state = [_grad_enabled()]
    for device in _AUTOCAST:
        on = torch.is_autocast_enabled(device)
        state.append((on, torch.get_autocast_dtype(device) if on else None))
    return tuple(state)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: any(torch.is_autocast_enabled(device) for device in _AUTOCAST))
_grad_enabled = torch.is_grad_enabled


def _set_torch_state(state: tuple, now: tuple) -> None:
    """Switch this thread from torch state `now` to `state` (`resume` calls it only when they differ)."""
    if state[0] != now[0]:
        torch.set_grad_enabled(state[0])
    off = (False, None)
    for i, device in enumerate(_AUTOCAST, start=1):
        want = state[i] if len(state) > i else off
        have = now[i] if len(now) > i else off
        if want != have:
            if want[1] is not None:
                torch.set_autocast_dtype(device, want[1])
            torch.set_autocast_enabled(device, want[0])


# -- errors ------------------------------------------------------------------------------------------

def event_name(event: Event | None) -> str:
    if event is None:
        return "the start of the invoke"
    path, kind = event[0], event[1]
    name = f"{path or 'model'}.{kind}" if path else f"model.{kind}"
    return name if len(event) < 3 else f"{name} (generation step {event[2]})"


def out_of_order(event: Event, before: Event | None) -> NNPatchError:
    if before is None:
        return NNPatchError(
            f"{event_name(event)} was never computed during the forward pass: the model does not call "
            "that module for these inputs, or it runs before a value this invoke read first")
    return NNPatchError(
        f"{event_name(event)} was read after {event_name(before)}, but the model computes it earlier, so "
        f"the forward pass had already gone past it. Read modules in the order the model runs "
        f"them ({event_name(event)} before {event_name(before)}), or read it in a separate trace")


def deadlock_error(stuck: list[Invoke]) -> NNPatchError:
    parts = []
    for inv in stuck:
        kind = inv.waiting[0] if inv.waiting else None
        if kind == "name":
            what = f"waits for {inv.waiting[2]!r} of invoke {inv.waiting[1].index}"
        elif kind == "barrier":
            b = inv.waiting[1]
            what = f"waits at {b!r}, which {len(b.arrived)} of {b.n} invokes reached"
        else:
            what = f"is at {event_name(inv.last_event)}"
        parts.append(f"invoke {inv.index} {what}")
    return NNPatchError(
        "these invokes wait for each other and no forward pass can satisfy them: "
        + "; ".join(parts) + ". Make sure every variable one invoke reads from another is assigned "
        "by a module the producer reaches, that every barrier(n) is called by n invokes, and that "
        "two invokes do not each need the other's later value")
