"""The bundled demo models: `available()`, `path(name)` and `load(name)`.

The registry and the weights live in `nnpatch/bundled/`; `load` wraps a bundled model as an
`nnpatch.LanguageModel` with its tokenizer.

Examples:
    >>> import nnpatch
    >>> nnpatch.models.available()
    ['ioi', 'table-max']
"""
from __future__ import annotations

from .bundled import available, path
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
    from transformers.utils import logging

    folder = str(path(name))
    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a few MB load at once; a bar would only be noise
    try:
        return LanguageModel(folder, **from_pretrained_kwargs)
    finally:
        if was_on:
            logging.enable_progress_bar()
