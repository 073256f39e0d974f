"""Module outputs handed out without a copy (engine/unshared.py) must behave exactly like copies.

An in-place edit of a module's output in a trace reaches the value that flows on, and nothing
else: not the module's input, a buffer or parameter it returned (a slice of), an attribute or a
list where it kept the output or a view of it, nor a value a user's own hook kept. Each case
edits the output in place and compares every observable with a plain-PyTorch reference that
replaces the output with an edited copy. One case checks that the copy is really skipped where
nothing else holds the output, so that these tests exercise the new path.
"""
import torch

import nnpatch
from conftest import all_hooks

kept_outside = []


class Keep(torch.nn.Module):
    """Returns a fresh tensor and keeps it, or a view of it, or hands it to a list."""

    def __init__(self, how):
        super().__init__()
        self.how, self.kept = how, None

    def forward(self, x):
        y = x * 2 + 1
        if self.how == "attribute":
            self.kept = y
        elif self.how == "view":
            self.kept = y[:, -1:]
        elif self.how == "list":
            kept_outside.append(y)
        elif self.how == "detached":
            self.kept = y.detach()
        return y


class Slice(torch.nn.Module):
    """Returns (a slice of) its own buffer or parameter."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.register_buffer("buf", torch.arange(8.0).reshape(2, 4))
        self.weight = torch.nn.Parameter(torch.arange(4.0).reshape(1, 4))

    def forward(self, x):
        if self.how == "buffer slice":
            return self.buf[:1]
        if self.how == "buffer":
            return self.buf
        if self.how == "buffer detached":
            return self.buf.detach()
        return self.weight


def build(middle):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), middle, torch.nn.Linear(4, 4)).eval()


def edited_reference(net, x):
    """The final output when module 1's output is replaced by an edited copy (zeros in column 0)."""
    def edit(module, args, output):
        out = output.clone()
        out[:, 0] = 0
        return out
    handle = net[1].register_forward_hook(edit)
    try:
        with torch.no_grad():
            return net(x)
    finally:
        handle.remove()


def trace_edit(net, x):
    model = nnpatch.Model(net)
    with torch.no_grad(), model.trace(x):
        first = model[0].output.save()
        model[1].output[:, 0] = 0
        out = model.output.save()
    return first, out


def check(net, x):
    """Run the trace's in-place edit and compare it with the copying reference."""
    hooks_before = all_hooks(net)
    reference = edited_reference(net, x)
    with torch.no_grad():
        first_reference = net[0](x)
    first, out = trace_edit(net, x)
    assert torch.allclose(out, reference, atol=1e-6)
    assert torch.allclose(first, first_reference, atol=1e-6)  # the edit never reached it
    assert all_hooks(net) == hooks_before


def test_identity_output_is_copied_so_the_input_is_untouched():
    check(build(torch.nn.Identity()), torch.randn(3, 4))


def test_dropout_in_eval_returns_its_input_and_is_copied():
    check(build(torch.nn.Dropout(0.5)), torch.randn(1, 4))


def test_an_output_the_module_keeps_is_not_edited_where_it_is_kept():
    for how in ("attribute", "view", "detached"):
        net = build(Keep(how))
        x = torch.randn(2, 4)
        check(net, x)
        with torch.no_grad():
            expected = net[0](x) * 2 + 1
        assert torch.allclose(net[1].kept, expected if how != "view" else expected[:, -1:]), how


def test_an_output_handed_to_a_list_is_not_edited_there():
    kept_outside.clear()
    net = build(Keep("list"))
    x = torch.randn(2, 4)
    check(net, x)
    with torch.no_grad():
        expected = net[0](x) * 2 + 1
    assert torch.allclose(kept_outside[-1], expected)


def test_buffers_and_parameters_returned_by_a_module_stay_as_they_were():
    for how in ("buffer slice", "buffer", "buffer detached", "parameter"):
        net = build(Slice(how))
        state = {k: v.clone() for k, v in net.state_dict().items()}
        check(net, torch.randn(1, 4))
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items()), how


def test_an_output_a_users_hook_kept_is_not_edited_there():
    net = build(Keep("none"))
    seen = []
    handle = net[1].register_forward_hook(lambda m, a, o: seen.append(o))
    x = torch.randn(2, 4)
    try:
        check(net, x)
    finally:
        handle.remove()
    with torch.no_grad():
        expected = net[0](x) * 2 + 1
    assert all(torch.allclose(s, expected) for s in seen) and len(seen) >= 2


def test_a_fresh_output_is_handed_out_without_a_copy_and_edits_flow_on():
    net = build(Keep("none"))
    x = torch.randn(2, 4)
    pointers = {}
    handles = [net[i].register_forward_hook(lambda m, a, o, i=i: pointers.__setitem__(i, o.data_ptr()))
               for i in range(3)]
    model = nnpatch.Model(net)
    try:
        with torch.no_grad(), model.trace(x):
            h = model[1].output
            h[:, 0] = 0
            out = model.output.save()
        handed_out = h.data_ptr()
    finally:
        for handle in handles:
            handle.remove()
    assert handed_out == pointers[1]  # no copy: the module's own tensor
    assert torch.allclose(out, edited_reference(net, x), atol=1e-6)


def test_with_gradients_every_output_is_still_copied():
    net = build(Keep("none"))
    model = nnpatch.Model(net)
    x = torch.randn(2, 4)
    pointers = {}
    handle = net[1].register_forward_hook(lambda m, a, o: pointers.__setitem__(1, o.data_ptr()))
    try:
        with model.trace(x):
            h = model[1].output
            loss = model.output.sum()
            loss.backward()
            g = h.grad.save()
    finally:
        handle.remove()
    assert h.data_ptr() != pointers[1]
    expected = torch.ones(2, 4) @ net[2].weight
    assert torch.allclose(g, expected, atol=1e-6)


def test_in_a_generation_an_output_a_users_hook_kept_is_not_edited_there():
    from conftest import gpt2, prompt, word_tokenizer
    hf = gpt2()
    model = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    forced = 7
    kept = []
    handle = hf.lm_head.register_forward_hook(lambda m, a, o: kept.append(o))
    try:
        with torch.no_grad(), model.generate(prompt(3, 5, 7), max_new_tokens=3, do_sample=False) as tracer:
            for step in tracer.iter[:]:
                model.lm_head.output[:, -1, forced] = 1e4
            ids = model.generator.output.save()
    finally:
        handle.remove()
    assert ids[0, -3:].tolist() == [forced] * 3  # the edit flowed on at every step
    assert len(kept) == 3 and all(float(k[:, -1, forced].max()) < 1e3 for k in kept)  # not where kept
    assert all_hooks(hf) == 0
