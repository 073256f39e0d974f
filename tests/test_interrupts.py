"""Ctrl-C at random moments: real SIGINTs land anywhere in traces (hooks being added, values
handed over, hooks being removed); afterwards the model has no hook left, grad mode is as it
was, and the model computes what it did before."""
import random
import signal
import threading
import time

import pytest
import torch

from conftest import all_hooks, block_envoys, prompt

A = prompt(1, 2, 3, 4, 5, 6)
B = prompt(1, 2, 9, 4, 5, 6)


def first(o):
    return o[0] if isinstance(o, tuple) else o


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_random_interrupts_leave_no_hook_and_grad_mode_restored(lm, hf):
    layers = block_envoys(lm)
    ids = torch.tensor([[int(w[1:]) + 2 for w in B.split()]])
    with torch.no_grad():
        before = hf(ids).logits

    def program(kind):
        if kind == 0:
            with lm.trace() as tracer:
                with tracer.invoke(A):
                    clean = first(layers[1].output)[:, -1]
                with tracer.invoke(B):
                    first(layers[1].output)[:, -1] = clean
                    out = lm.output.logits.save()
        elif kind == 1:
            with lm.trace() as tracer:
                with tracer.invoke(A):
                    late = first(layers[2].output)[:, -1]
                with tracer.invoke(B):
                    first(layers[0].output)[:, -1] = late  # a second pass
                    out = lm.output.logits.save()
        else:
            with lm.trace(A):
                h = first(layers[1].output)
                loss = lm.output.logits[0, -1].sum()
                with loss.backward():
                    g = h.grad.save()
            out = g
        return out

    # Interrupts land at a random point of each program, or just after it: delays are drawn
    # from 0 to 1.5 times the program's own duration on this machine.
    duration = []
    for kind in range(3):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            program(kind)
            times.append(time.perf_counter() - start)
        duration.append(sorted(times)[1])
    rng = random.Random(0)
    interrupted = completed = 0
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for i in range(150):
            sent = threading.Event()

            def fire():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                sent.set()
            timer = threading.Timer(rng.uniform(0.0, 1.5 * duration[i % 3]), fire)
            try:
                try:
                    timer.start()
                    program(i % 3)
                    completed += 1
                finally:  # an interrupt that comes after the program lands here
                    sent.wait(5)
                    for _ in range(1000):
                        pass
            except KeyboardInterrupt:
                interrupted += 1
            timer.join()
            assert all_hooks(hf) == 0, f"hooks left after run {i}"
            assert torch.is_grad_enabled()
    finally:
        signal.signal(signal.SIGINT, previous)
    hf.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, before)
    assert interrupted > 0 and completed > 0, (interrupted, completed)  # both outcomes happened
