"""The registry of the demo models that ship inside nnpatch, next to their weights.

Each bundled model is a Hugging Face folder beside this file, `nnpatch/bundled/<name>/` (config, safetensors
weights, a word-level tokenizer), so it loads offline through nnpatch or plain transformers:

* `"ioi"`: a 4-layer GPT-2 trained on indirect object identification
  ("When Mary and John went to the store, John gave a drink to" -> " Mary").
* `"table-max"`: a small Llama that reads a table of labelled rows and answers its maximum y-value.

`nnpatch.tasks` (the module `tasks.py` beside this file) generates held-out clean/corrupt prompt
pairs for both, and `scripts/train_bundled.py` retrains them from a seed. `nnpatch.models.load`
wraps one as an `nnpatch.LanguageModel`; this registry needs nothing from the engine.

Examples:
    >>> import nnpatch
    >>> nnpatch.models.available()
    ['ioi', 'table-max']
    >>> from transformers import AutoModelForCausalLM
    >>> net = AutoModelForCausalLM.from_pretrained(nnpatch.models.path("ioi"))
"""
from __future__ import annotations

import contextlib
import difflib
import warnings
from pathlib import Path

from ..errors import NNPatchValueError

_ROOT = Path(__file__).parent


def available() -> list[str]:
    """The names of the bundled models, sorted.

    Examples:
        >>> import nnpatch
        >>> "ioi" in nnpatch.models.available()
        True
    """
    if not _ROOT.is_dir():
        return []
    return sorted(p.name for p in _ROOT.iterdir() if (p / "config.json").is_file())


def path(name: str) -> Path:
    """The folder of bundled model `name`; pass it to any `from_pretrained`.

    Examples:
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
        raise NNPatchValueError(
            f"no bundled model named {name!r}; {hint}the bundled models are {names} "
            "(for other models give nnpatch.LanguageModel a local folder or a loaded module)")
    return _ROOT / name


@contextlib.contextmanager
def quiet_loading():
    """No transformers "Loading weights" bar while a bundled model loads (a few MB, at once: a
    bar is only noise, and in a notebook a widget that a saved notebook cannot show); the caller's
    setting is put back afterwards.

    Examples:
        >>> import nnpatch
        >>> from transformers import AutoModelForCausalLM
        >>> from nnpatch.bundled import quiet_loading
        >>> with quiet_loading():
        ...     net = AutoModelForCausalLM.from_pretrained(nnpatch.models.path("ioi"))
    """
    from huggingface_hub import utils as hub
    from transformers.utils import logging

    was_on, hub_off = logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    logging.disable_progress_bar()  # transformers' bars and the hub's
    try:
        yield
    finally:
        if was_on:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # HF_HUB_DISABLE_PROGRESS_BARS keeps the hub's off
                logging.enable_progress_bar()
        if hub_off:
            hub.disable_progress_bars()
