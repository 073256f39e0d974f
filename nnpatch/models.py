"""The bundled demo models: `available()`, `path(name)` and `load(name)`.

The registry and the weights live in `nnpatch/bundled/`; `load` wraps a bundled model as an
`nnpatch.LanguageModel` with its tokenizer.

Examples:
    >>> import nnpatch
    >>> nnpatch.models.available()
    ['ioi', 'table-max']
"""
from __future__ import annotations

from .bundled import available, path, quiet_loading
from .engine import LanguageModel

__all__ = ["available", "path", "load"]


def load(name: str, **from_pretrained_kwargs) -> LanguageModel:
    """Bundled model `name` wrapped as an `nnpatch.LanguageModel`, with its tokenizer.

    Keyword arguments go to `AutoModelForCausalLM.from_pretrained` (e.g. `torch_dtype`).

    Examples:
        >>> import nnpatch
        >>> model = nnpatch.models.load("ioi")
        >>> model.tokenizer.decode(model.to_tokens(" Mary"))
        ' Mary'
    """
    folder = str(path(name))
    with quiet_loading():  # no "Loading weights" bar
        return LanguageModel(folder, **from_pretrained_kwargs)
