"""`tracer.stop()`: end an invoke's program there, and the forward pass once no invoke needs more.

`Stop` is raised inside the invoke that calls `tracer.stop()`: the rest of its block does not run,
and what it assigned before the call is kept. Once every invoke of the forward pass has finished
and one of them asked to stop, the hook the model is in raises `EndForward`, which the forward
pass catches: no module after that point runs. Both are BaseExceptions, so that no
`except Exception:` in the user's code or in the model's forward can swallow them.

Example:
    >>> import torch, nnpatch
    >>> net = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)))
    >>> with net.trace(torch.ones(1, 3)) as tracer:
    ...     first = net[0].output.save()
    ...     tracer.stop()                  # net[1] never runs
    >>> first.shape
    torch.Size([1, 3])
"""
from __future__ import annotations


class Stop(BaseException):
    """Raised by `tracer.stop()` inside an invoke: the rest of its program is skipped."""


class EndForward(BaseException):
    """Raised from a hook once every invoke is done and one asked to stop: ends the forward."""

