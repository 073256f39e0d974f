"""`model.scan(...)` / `model.trace(..., scan=True)`: a trace that computes shapes, not values.

The invokes' inputs are tokenized and checked as in any trace; then the forward pass and the
invokes' programs run under PyTorch's fake tensors (`FakeTensorMode`): every module value has
its real shape, dtype and device, and no arithmetic is done, so a scan of a large model is quick
and allocates nothing. Edits are checked as in a real trace (a value of the wrong shape is the
same error). Values a scan leaves behind are fake tensors: read their `.shape` and `.dtype`,
not their contents.

Example:
    >>> import torch, nnpatch
    >>> net = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)))
    >>> with net.scan(torch.ones(4, 3)):
    ...     shape = net[0].output.shape
    >>> shape
    torch.Size([4, 5])
"""
from __future__ import annotations

import contextlib


def scan_mode(tracer):
    """The context a forward pass of `tracer` runs in: fake tensors for a scan."""
    if not getattr(tracer, "scan", False):
        return contextlib.nullcontext()
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


def prepare_scan(tracer, batch) -> None:
    """A scan's forward gets an explicit all-ones attention mask where it has none: without one
    some models look at the token ids' values (a padding warning), which fake tensors lack."""
    if not getattr(tracer, "scan", False):
        return
    ids = batch.kwargs.get("input_ids")
    if ids is not None and "attention_mask" not in batch.kwargs and "attention_mask" in tracer.model._accepts:
        import torch
        batch.kwargs["attention_mask"] = torch.ones_like(ids)
