"""Every example in nnpatch's docstrings runs and prints what it shows."""
import builtins
import doctest
import importlib
import pkgutil

import pytest

import nnpatch

MODULES = ["nnpatch"] + [m.name for m in pkgutil.walk_packages(nnpatch.__path__, "nnpatch.")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    had_underscore = "_" in builtins.__dict__
    try:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    finally:
        if not had_underscore:  # doctest leaves `builtins._ = None`, which stops IPython setting `_`
            builtins.__dict__.pop("_", None)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
