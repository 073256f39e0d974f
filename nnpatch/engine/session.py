"""`model.session()`: several traces in one block, each using the values of the ones before.

Every nnpatch trace already writes the variables its body assigns back to the caller when it
ends, so a later trace (or any code) reads them as it reads any variable, and everything assigned
stays available after the block. A session adds what makes the block one unit: it holds the model
for the whole block, so another thread's trace of the same model waits until the session ends
instead of running between two of its traces, and it counts its traces (`session.traces`).

Example:
    >>> import torch, nnpatch
    >>> net = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)))
    >>> with net.session() as session:
    ...     with net.trace(torch.ones(1, 3)):
    ...         hidden = net[0].output
    ...     with net.trace(torch.zeros(1, 3)):
    ...         net[0].output = hidden                  # the first trace's value, patched in
    ...         out = net.output.save()
    >>> bool(torch.allclose(out, net(torch.ones(1, 3)))), session.traces
    (True, 2)
"""
from __future__ import annotations

import contextlib
import weakref

from .hooks import exclusive

# The sessions open on each torch module, innermost last (the module itself is not touched).
_OPEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Session:
    """The object of `with model.session() as session:`."""

    def __init__(self, model):
        self.model = model
        self.traces = 0  # traces of this model run inside the block
        self._hold: contextlib.ExitStack | None = None

    def __enter__(self) -> "Session":
        self._hold = contextlib.ExitStack()
        self._hold.enter_context(exclusive(self.model._module))
        _OPEN.setdefault(self.model._module, []).append(self)
        return self

    def __exit__(self, *exc) -> bool:
        sessions = _OPEN.get(self.model._module, [])
        if self in sessions:
            sessions.remove(self)
        if not sessions:
            _OPEN.pop(self.model._module, None)
        self._hold.close()
        return False


def count_trace(model) -> None:
    """A trace of `model` ran: the innermost open session of its module counts it."""
    sessions = _OPEN.get(model._module)
    if sessions:
        sessions[-1].traces += 1
