"""backward() in a trace accumulates into leaves' .grad (steering vectors, model parameters), as
PyTorch does; each test against plain forward hooks + torch backward on a separate model with the
same weights."""
import pytest
import torch

import nnpatch
from conftest import block_envoys, blocks, gpt2, ids, llama, prompt, word_tokenizer

A = prompt(3, 5, 7, 9, 11, 13)
SHORT = prompt(20, 21, 22, 23)
ANS, WRONG = 11, 23
D = 32


def metric(logits):
    return logits[0, -1, ANS] - logits[0, -1, WRONG]


def make(arch, frozen=False):
    hf = gpt2() if arch == "gpt2" else llama()
    if frozen:
        hf.requires_grad_(False)
    return hf


@pytest.fixture
def pair(arch):
    """(model under a LanguageModel, a separate reference model with the same weights)."""
    hf, ref = make(arch), make(arch)
    assert all(torch.equal(p, q) for p, q in zip(hf.parameters(), ref.parameters()))
    return nnpatch.LanguageModel(hf, tokenizer=word_tokenizer()), hf, ref


def vector(seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(D, generator=g) * 0.1, requires_grad=requires_grad)


def twin(p):
    return torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


def hidden(out):
    return out[0] if isinstance(out, tuple) else out


def steered_logits(hf, text, *adds, layer=1, grad_hook=None):
    """Reference: logits of a plain forward with `adds` added to block `layer`'s output, and
    `grad_hook` (layer, fn) a tensor hook replacing the gradient of that block's output."""
    def add(m, args, out):
        h = hidden(out)
        for a in adds:
            h = h + a
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def hook_grad(m, args, out):
        hidden(out).register_hook(grad_hook[1])

    handles = [blocks(hf)[layer].register_forward_hook(add)]
    if grad_hook is not None:
        handles.append(blocks(hf)[grad_hook[0]].register_forward_hook(hook_grad))
    try:
        return hf(ids(text)).logits
    finally:
        for h in handles:
            h.remove()


def close(a, b, tol=1e-5):
    return a is not None and b is not None and a.shape == b.shape and \
        torch.allclose(a.double(), b.double(), atol=tol, rtol=tol)


def same_param_grads(hf, ref, tol=1e-5):
    for (name, p), (_, q) in zip(hf.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            assert close(p.grad, q.grad, tol), name


# -- one steering vector ----------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["plain", "block"])
def test_steering_vector_and_parameters_get_reference_grads(pair, form):
    lm, hf, ref = pair
    steer = vector(0)
    layers = block_envoys(lm)
    with lm.trace(A):
        h = layers[1].output[0]
        h += steer
        loss = metric(lm.output.logits)
        if form == "plain":
            loss.backward()
        else:
            with loss.backward():
                pass
    steer_ref = twin(steer)
    loss_ref = metric(steered_logits(ref, A, steer_ref))
    loss_ref.backward()
    assert torch.allclose(loss.detach(), loss_ref.detach(), atol=1e-6)
    assert close(steer.grad, steer_ref.grad)
    assert close(hf.lm_head.weight.grad, ref.lm_head.weight.grad)
    same_param_grads(hf, ref)


def test_grads_accumulate_over_traces_and_reset(pair):
    lm, hf, ref = pair
    steer = vector(1)
    steer_ref = twin(steer)
    layers = block_envoys(lm)
    for text in (A, SHORT):
        with lm.trace(text):
            layers[1].output[0][:] += steer
            metric(lm.output.logits).backward()
        metric(steered_logits(ref, text, steer_ref)).backward()   # PyTorch: two backwards add up
    assert close(steer.grad, steer_ref.grad)
    same_param_grads(hf, ref)

    steer.grad = None
    steer_ref.grad = None
    hf.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    with lm.trace(A):
        layers[1].output[0][:] += steer
        metric(lm.output.logits).backward()
    metric(steered_logits(ref, A, steer_ref)).backward()
    assert close(steer.grad, steer_ref.grad)
    same_param_grads(hf, ref)


def test_sgd_steps_through_traces_equal_plain_hooks(arch):
    hf, ref = make(arch, frozen=True), make(arch, frozen=True)
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    steer = vector(2)
    steer_ref = twin(steer)
    opt = torch.optim.SGD([steer], lr=0.5, momentum=0.9)
    opt_ref = torch.optim.SGD([steer_ref], lr=0.5, momentum=0.9)
    layers = block_envoys(lm)
    losses, losses_ref = [], []
    for _ in range(4):
        with lm.trace(A):
            layers[1].output[0][:] += steer
            loss = -metric(lm.output.logits)
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())

        loss_ref = -metric(steered_logits(ref, A, steer_ref))
        loss_ref.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        losses_ref.append(loss_ref.item())
    assert losses == pytest.approx(losses_ref, abs=1e-5)
    assert losses[-1] < losses[0]                       # training did something
    assert close(steer.detach(), steer_ref.detach())
    assert all(p.grad is None for p in hf.parameters())  # frozen model: only the vector learns


# -- gradient edits ------------------------------------------------------------------------------

def test_grad_edit_in_block_reaches_leaves(pair):
    lm, hf, ref = pair
    steer = vector(3)
    layers = block_envoys(lm)
    with lm.trace(A):
        h1 = layers[1].output[0]
        h1 += steer
        h2 = layers[2].output[0]
        with metric(lm.output.logits).backward():
            before = h2.grad.clone()
            h2.grad = h2.grad * 3.0 - 0.5              # replaces what flows back from h2
            seen = steer.grad                          # a leaf read in the block: what it will be
            g1 = h1.grad                               # recomputed after the edit
    steer_ref = twin(steer)
    metric(steered_logits(ref, A, steer_ref, grad_hook=(2, lambda g: g * 3.0 - 0.5))).backward()
    assert close(steer.grad, steer_ref.grad)          # accumulated once, with the edit
    assert close(seen, steer_ref.grad)
    assert close(g1.sum(0), steer.grad)                # steer's gradient sums h1's over positions
    same_param_grads(hf, ref)
    assert before is not None and not close(before, h2.grad)


def test_plain_backward_accumulates_at_once(pair):
    """A plain call is PyTorch's backward: an edit after it changes later .grad reads of module
    values, not what the leaves already accumulated."""
    lm, hf, ref = pair
    steer = vector(4)
    layers = block_envoys(lm)
    with lm.trace(A):
        layers[1].output[0][:] += steer
        h2 = layers[2].output[0]
        metric(lm.output.logits).backward()
        h2.grad = h2.grad * 3.0 - 0.5
        after = steer.grad
    steer_ref = twin(steer)
    metric(steered_logits(ref, A, steer_ref)).backward()
    assert close(steer.grad, steer_ref.grad)
    assert after is steer.grad


def test_gradient_and_inputs_arguments(pair):
    lm, hf, ref = pair
    steer = vector(5)
    w = torch.randn(60, generator=torch.Generator().manual_seed(6))
    layers = block_envoys(lm)
    with lm.trace(A):
        layers[1].output[0][:] += steer
        lm.output.logits[0, -1].backward(w, inputs=[steer])     # only steer accumulates
    steer_ref = twin(steer)
    steered_logits(ref, A, steer_ref)[0, -1].backward(w, inputs=[steer_ref])
    assert close(steer.grad, steer_ref.grad)
    assert all(p.grad is None for p in hf.parameters())

    with lm.trace(A):
        layers[1].output[0][:] += steer
        with lm.output.logits[0, -1].backward(gradient=w):
            pass
    steered_logits(ref, A, steer_ref)[0, -1].backward(gradient=w)
    assert close(steer.grad, steer_ref.grad)
    same_param_grads(hf, ref)


# -- several invokes -----------------------------------------------------------------------------

def test_two_invokes_each_backward_accumulates_its_own(pair):
    """Like two separate runs with a backward each: a vector used by one invoke gets that
    invoke's gradient, a vector both use (and every parameter) the sum."""
    lm, hf, ref = pair
    a, b, shared = vector(7), vector(8), vector(9)
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(A):
            layers[1].output[0][:] += a + shared
            with metric(lm.output.logits).backward():
                pass
        with tracer.invoke(SHORT):                   # shorter: left-padded in the batch
            layers[1].output[0][:] += b + shared
            metric(lm.output.logits).backward()
    a_ref, b_ref, shared_ref = twin(a), twin(b), twin(shared)
    metric(steered_logits(ref, A, a_ref, shared_ref)).backward()
    metric(steered_logits(ref, SHORT, b_ref, shared_ref)).backward()
    assert close(a.grad, a_ref.grad)
    assert close(b.grad, b_ref.grad)
    assert close(shared.grad, shared_ref.grad)
    same_param_grads(hf, ref)


def test_invoke_run_again_accumulates_once():
    """An invoke whose value was edited after it flowed on, and which then waits for another
    invoke, runs again from the start: its backward call still accumulates once."""
    hf, ref = make("gpt2", frozen=True), make("gpt2", frozen=True)
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    steer = vector(14)
    layers = block_envoys(lm)
    with lm.trace() as tracer:
        with tracer.invoke(A):
            h0 = layers[0].output[0]
            h0 += steer
            h1 = layers[1].output[0]
            h1.sum().backward()
            h0[:] = h0 * 1.0                         # an edit after layer 0's value flowed on
            y = x                                    # waits for the other invoke
            z = lm.lm_head.output
        with tracer.invoke(SHORT):
            x = layers[2].output[0].sum()
    steer_ref = twin(steer)
    out = {}
    handle = blocks(ref)[1].register_forward_hook(lambda m, a, o: out.setdefault("h1", hidden(o)))
    try:
        steered_logits(ref, A, steer_ref, layer=0)
    finally:
        handle.remove()
    out["h1"].sum().backward()
    assert close(steer.grad, steer_ref.grad)


# -- nothing else --------------------------------------------------------------------------------

def test_only_leaves_that_require_grad_and_are_used(arch):
    hf = make(arch)
    hf.lm_head.requires_grad_(False)
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    steer, fixed, unused = vector(10), vector(11, requires_grad=False), vector(12)
    layers = block_envoys(lm)
    with lm.trace(A):
        layers[1].output[0][:] += steer + fixed
        metric(lm.output.logits).backward()
    assert steer.grad is not None
    assert fixed.grad is None and unused.grad is None
    assert hf.lm_head.weight.grad is None
    assert all(p.grad is not None for p in blocks(hf)[0].parameters())


def test_no_grad_around_the_trace_records_no_graph(arch):
    hf = make(arch)
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    steer = vector(13)
    layers = block_envoys(lm)
    with pytest.raises(nnpatch.NNPatchError, match="no_grad"):
        with torch.no_grad():
            with lm.trace(A):
                layers[1].output[0][:] += steer
                metric(lm.output.logits).backward()
    assert steer.grad is None
    assert all(p.grad is None for p in hf.parameters())
