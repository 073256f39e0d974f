"""The errors nnpatch raises on purpose.

`NNPatchError` is the one base class: `except nnpatch.NNPatchError` catches every error nnpatch
raises on purpose, and nothing else. Where a Python user would expect a builtin exception, the
error is also an instance of that builtin, so code written for plain PyTorch, Hugging Face or
nnsight (`except ValueError:`, `except AttributeError:`, `hasattr(...)`) keeps working:

- `NNPatchValueError` (a ValueError): a value of the right type that nnpatch cannot use: a prompt
  longer than the model's context, a token id outside the vocabulary, an answer that is two
  tokens, an unknown site or metric name, shapes that do not fit.
- `NNPatchTypeError` (a TypeError): an argument of the wrong type (float token ids, a string where
  a module goes), or a missing or unexpected argument.
- `NNPatchIndexError` (an IndexError): an index out of range (a layer, a heatmap cell).
- `NNPatchAttributeError` (an AttributeError): a module or attribute the model does not have.
- `NNPatchKeyError` (a KeyError): a name missing from a mapping (an entry of a module dict).
- `NNPatchError` itself: misuse of a trace that has no builtin counterpart, e.g. reading modules
  out of order, invokes that wait for each other, a trace whose source cannot be read.

Every message says what was wrong (the module path or input, the shapes or limits) and how to
fix it.

    >>> from nnpatch.errors import NNPatchError, NNPatchValueError
    >>> try:
    ...     raise NNPatchValueError("prompt 0 is 80 tokens long; the model's context is 64 tokens")
    ... except ValueError as e:
    ...     isinstance(e, NNPatchError)
    True
"""


class NNPatchError(Exception):
    """A misuse of nnpatch; the message says what was wrong and how to fix it."""


class NNPatchValueError(NNPatchError, ValueError):
    """A value of the right type that nnpatch cannot use (also a ValueError)."""


class NNPatchTypeError(NNPatchError, TypeError):
    """An argument of the wrong type, or a missing or unexpected argument (also a TypeError)."""


class NNPatchIndexError(NNPatchError, IndexError):
    """An index out of range (also an IndexError)."""


class NNPatchAttributeError(NNPatchError, AttributeError):
    """A module or attribute that does not exist (also an AttributeError, so hasattr() works)."""


class NNPatchKeyError(NNPatchError, KeyError):
    """A name missing from a mapping (also a KeyError). Its message prints as written, not
    quoted as a plain KeyError's is."""

    def __str__(self) -> str:
        return Exception.__str__(self)


__all__ = ["NNPatchError", "NNPatchValueError", "NNPatchTypeError", "NNPatchIndexError",
           "NNPatchAttributeError", "NNPatchKeyError"]
