"""A finished invoke's greenlet runs the next invoke (engine/invoke.py, `_InvokeGreenlet`).

Reuse saves the allocation of a fresh Python frame stack per invoke, and must change nothing a
program can observe: values are those of plain-PyTorch hooks, a greenlet that waits for its next
invoke holds nothing of the last one, each invoke starts in a fresh contextvars context, an invoke
that raises or is closed ends its greenlet (the error reaches the user as before), and each thread
has greenlets of its own.
"""
import contextvars
import gc
import threading
import weakref

import greenlet
import pytest
import torch

import nnpatch
from nnpatch.engine import invoke as invoke_module
from conftest import all_hooks

VAR = contextvars.ContextVar("nnpatch_test_var", default="unset")


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4)).eval()


def greenlet_of_a_trace(model):
    """The greenlet the body of a one-read trace ran on."""
    with model.trace(torch.randn(1, 4)):
        ran_on = greenlet.getcurrent()
        h = model[0].output
    return ran_on


def reference(net, x, edit_at=None):
    """Outputs of each layer by plain hooks; layer `edit_at`'s output gets +1."""
    kept = {}

    def keep(i):
        def hook(module, args, output):
            if i == edit_at:
                output = output + 1
            kept[i] = output.detach().clone()
            return output
        return hook
    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(net)]
    try:
        out = net(x)
    finally:
        for h in handles:
            h.remove()
    return kept, out


def test_traces_in_a_row_reuse_one_greenlet_and_get_plain_pytorch_values():
    net = build()
    model = nnpatch.Model(net)
    seen = []
    for step in range(4):
        x = torch.randn(2, 4)
        with model.trace(x):
            seen.append(greenlet.getcurrent())
            model[1].output[:] = model[1].output + 1
            a = model[2].output
            out = model.output
        ref, ref_out = reference(net, x, edit_at=1)
        torch.testing.assert_close(a, ref[2], rtol=0, atol=0)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert all(g is seen[0] for g in seen), "a finished invoke's greenlet should run the next one"
    assert all_hooks(net) == 0


def test_an_idle_greenlet_holds_nothing_of_the_invoke_it_ran():
    net = build()
    model = nnpatch.Model(net)

    def run():
        with model.trace(torch.randn(2, 4)):
            big = model[0].output * 3
            marker = torch.ones(1000)
        return weakref.ref(big), weakref.ref(marker)

    refs = run()
    gc.collect()
    assert [r() for r in refs] == [None, None]
    idle = invoke_module._idle_workers()
    assert idle and all(g.invoke is None for g in idle)


def test_each_invoke_starts_in_a_fresh_context_as_a_new_greenlet_would():
    model = nnpatch.Model(build())
    got = []
    for _ in range(3):
        with model.trace(torch.randn(1, 4)):
            got.append(VAR.get())
            VAR.set("set in a trace body")
            h = model[0].output
    assert got == ["unset", "unset", "unset"]
    assert VAR.get() == "unset"


def test_an_invoke_that_raises_ends_its_greenlet_and_the_next_trace_works():
    net = build()
    model = nnpatch.Model(net)
    used = greenlet_of_a_trace(model)
    ran_on = []  # a failed trace writes no variable back: the body appends to a list instead
    with pytest.raises(ZeroDivisionError):
        with model.trace(torch.randn(1, 4)):
            ran_on.append(greenlet.getcurrent())
            h = model[0].output
            1 / 0
    failed = ran_on[0]
    assert failed is used and failed.dead
    assert failed not in invoke_module._idle_workers()
    x = torch.randn(1, 4)
    with model.trace(x):
        after = greenlet.getcurrent()
        out = model.output
    assert after is not failed and not after.dead
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    assert all_hooks(net) == 0


def test_a_failed_trace_closes_paused_invokes_and_runs_their_finally_blocks():
    """Invoke 0 is paused (it waits for layer 2) when invoke 1 fails at layer 0: closing it ends
    its greenlet, whose finally block runs once; finished invokes are not touched."""
    net = build()
    model = nnpatch.Model(net)
    log = []
    with pytest.raises(RuntimeError, match="boom"):
        with model.trace() as tracer:
            with tracer.invoke(torch.randn(1, 4)):
                try:
                    a = model[2].output
                finally:
                    log.append("finally 0")
            with tracer.invoke(torch.randn(1, 4)):
                b = model[0].output
                raise RuntimeError("boom")
    assert log == ["finally 0"]
    assert all(not g.dead and g.invoke is None for g in invoke_module._idle_workers())
    assert all_hooks(net) == 0


def test_many_invokes_in_one_trace_each_get_their_own_greenlet_and_idle_ones_are_capped():
    net = build()
    model = nnpatch.Model(net)
    xs = [torch.randn(1, 4) for _ in range(12)]
    ids = []
    outs = []
    with model.trace() as tracer:
        for x in xs:
            with tracer.invoke(x):
                ids.append(id(greenlet.getcurrent()))
                outs.append(model[2].output)
    assert len(set(ids)) == len(xs)  # all paused at once: one greenlet each
    batched = net(torch.cat(xs))  # one forward pass of the 12 rows, as the trace runs
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, batched[i:i + 1], rtol=0, atol=0)
    assert len(invoke_module._idle_workers()) <= invoke_module._MAX_IDLE


def test_each_thread_runs_invokes_on_greenlets_of_its_own():
    net = build()
    model = nnpatch.Model(net)
    here = greenlet_of_a_trace(model)
    found = {}

    def other():
        x = torch.randn(1, 4)
        with model.trace(x):
            found["g"] = greenlet.getcurrent()
            found["out"] = model.output
        found["ref"] = net(x)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert found["g"] is not here
    torch.testing.assert_close(found["out"], found["ref"], rtol=0, atol=0)
