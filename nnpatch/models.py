"""The demo models that ship inside nnpatch, trained by the project on synthetic tasks.

Each bundled model is a Hugging Face folder under `nnpatch/bundled/<name>/` (config, safetensors
weights, a word-level tokenizer), so it loads offline through nnpatch or plain transformers:

* `"ioi"`: a 4-layer GPT-2 trained on indirect object identification
  ("When Mary and John went to the store, John gave a drink to" -> " Mary").
* `"table-max"`: a small Llama that reads a table of labelled rows and answers its maximum y-value.

`nnpatch.tasks` generates held-out clean/corrupt prompt pairs for both, and
`scripts/train_bundled.py` retrains them from a seed.

Example:
    >>> import nnpatch
    >>> nnpatch.models.available()
    ['ioi', 'table-max']
    >>> from transformers import AutoModelForCausalLM
    >>> net = AutoModelForCausalLM.from_pretrained(nnpatch.models.path("ioi"))
"""
from __future__ import annotations

import difflib
from pathlib import Path

from .errors import NNPatchError

_ROOT = Path(__file__).parent / "bundled"


def available() -> list[str]:
    """The names of the bundled models, sorted.

    Example:
        >>> import nnpatch
        >>> "ioi" in nnpatch.models.available()
        True
    """
    if not _ROOT.is_dir():
        return []
    return sorted(p.name for p in _ROOT.iterdir() if (p / "config.json").is_file())


def path(name: str) -> Path:
    """The folder of bundled model `name`; pass it to any `from_pretrained`.

    Example:
        >>> import nnpatch
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained(nnpatch.models.path("table-max"))
        >>> len(tok(" 34")["input_ids"])
        1
    """
    names = available()
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise NNPatchError(
            f"no bundled model named {name!r}; {hint}the bundled models are {names} "
            "(for other models give nnpatch.LanguageModel a local folder or a loaded module)")
    return _ROOT / name


def load(name: str, **from_pretrained_kwargs):
    """Bundled model `name` wrapped as an `nnpatch.LanguageModel`, with its tokenizer.

    Keyword arguments go to `AutoModelForCausalLM.from_pretrained` (e.g. `torch_dtype`).

    Example:
        >>> import nnpatch
        >>> model = nnpatch.models.load("ioi")
        >>> model.tokenizer.decode(model.to_tokens(" Mary"))
        ' Mary'
    """
    from transformers.utils import logging

    from .model import LanguageModel
    folder = str(path(name))
    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a few MB load at once; a bar would only be noise
    try:
        return LanguageModel(folder, **from_pretrained_kwargs)
    finally:
        if was_on:
            logging.enable_progress_bar()
