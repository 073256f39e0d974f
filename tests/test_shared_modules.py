"""A module object the model holds at several paths.

Hooks belong to module objects, not paths: a hook on a module that the model holds twice fires
at both of its calls. Reading such a module at its second path used to return the call from its
first place, without a word, when the two paths have different parents (transformers 5.5 with the
`kernels` package gives every Llama attention one shared `rotary_fn`, called once per layer), and
a misleading "has no attribute 'output'" when they share one (one activation module placed twice
in a Sequential). Now a later path is a ValueError that names both paths; the first path reads
the first call, as for any module called twice.
"""
import pytest
import torch

import nnpatch
from conftest import all_hooks
from nnpatch.engine.hooks import hooks, resolve
from nnpatch.errors import NNPatchValueError


class Block(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.f = f  # the same module object in every block (like transformers 5.5's rotary_fn)

    def forward(self, x):
        return self.f(self.lin(x))


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        shared = torch.nn.Tanh()
        self.blocks = torch.nn.ModuleList([Block(shared), Block(shared)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def calls_of(module, net, x):
    """Every output of `module` in one forward of `net`, by a plain hook."""
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        net(x)
    finally:
        handle.remove()
    return seen


@pytest.fixture
def two_blocks():
    torch.manual_seed(0)
    return TwoBlocks().eval()


def test_the_second_place_of_a_shared_module_is_an_error_naming_both(two_blocks):
    model = nnpatch.Model(two_blocks)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"blocks\.1\.f is the same Tanh object as blocks\.0\.f") as info:
        with model.trace(x):
            wrong = model.blocks[1].f.output  # noqa: F841
    assert isinstance(info.value, NNPatchValueError)
    assert "blocks.1" in str(info.value)  # the module that calls it there: what to read instead
    assert all_hooks(two_blocks) == 0


def test_the_first_place_reads_the_first_call_and_the_callers_read_each_place(two_blocks):
    model = nnpatch.Model(two_blocks)
    x = torch.randn(2, 4)
    calls = calls_of(two_blocks.blocks[0].f, two_blocks, x)
    assert len(calls) == 2 and not torch.allclose(calls[0], calls[1])
    with model.trace(x):
        first = model.blocks[0].f.output
        out0 = model.blocks[0].output
        out1 = model.blocks[1].output
    assert torch.equal(first, calls[0])
    assert torch.equal(out0, calls[0]) and torch.equal(out1, calls[1])


def test_a_module_placed_twice_in_one_container_is_the_same_error():
    torch.manual_seed(0)
    act = torch.nn.GELU()
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), act, torch.nn.Linear(4, 4), act)
    model = nnpatch.Model(net)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"3 is the same GELU object as 1"):
        with model.trace(x):
            wrong = model[3].output  # noqa: F841
    with pytest.raises(ValueError, match=r"3 is the same GELU object as 1"):
        with model.trace(x):
            model[3].output = torch.zeros(2, 4)
    assert all_hooks(net) == 0
    with model.trace(x):
        first = model[1].output
    assert torch.equal(first, torch.nn.functional.gelu(net[0](x)))


def test_hooks_by_path_refuse_it_too(two_blocks):
    with pytest.raises(ValueError, match="same Tanh object"):
        with hooks(two_blocks, [("blocks.1.f", "output", lambda *a: None)]):
            pass
    assert all_hooks(two_blocks) == 0
    assert resolve(two_blocks, "blocks.0.f") is two_blocks.blocks[1].f


def test_giving_each_place_its_own_module_makes_both_readable(two_blocks):
    model = nnpatch.Model(two_blocks)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError):
        with model.trace(x):
            wrong = model.blocks[1].f.output  # noqa: F841
    two_blocks.blocks[1].f = torch.nn.Tanh()  # the model changed after the error: no stale answer
    calls = calls_of(two_blocks.blocks[1].f, two_blocks, x)
    with model.trace(x):
        second = model.blocks[1].f.output
    assert len(calls) == 1 and torch.equal(second, calls[0])
