"""Prompt pairs: clean and corrupt prompts with the answer and wrong tokens, in every form a user
gives them, and the default pairs of each bundled model.

Task pairs are any object with list attributes `clean` and `corrupt` (and optionally `answer`,
`wrong`), such as `nnpatch.tasks.ioi(8)`; the sweeps, the magics, the CLI and the workbench all
read them here.

    >>> import nnpatch
    >>> from nnpatch.patching.pairs import unpack
    >>> clean, corrupt, answer, wrong = unpack(nnpatch.tasks.ioi(2, template=0))
    >>> len(clean), len(corrupt), answer[0] in clean[0]
    (2, 2, True)
"""
from __future__ import annotations

import torch

from ..bundled import tasks
from ..errors import NNPatchTypeError, NNPatchValueError

FIELDS = ("clean", "corrupt", "answer", "wrong")

# The pairs a bundled model is swept on when none are given. IOI uses one template so that every
# pair has the same length and positions line up across pairs.
_DEFAULTS = {
    "ioi": lambda n: tasks.ioi(n, template=0),
    "table-max": lambda n: tasks.table_max(n),
}


def default_pairs(model_name: str, n: int = 8):
    """The task pairs bundled model `model_name` is swept on by default."""
    make = _DEFAULTS.get(model_name.replace("_", "-"))
    if make is None:
        raise NNPatchValueError(f"model {model_name!r} has no default prompt pairs; give clean and corrupt "
                                f"prompts (models with defaults: {', '.join(sorted(_DEFAULTS))})")
    return make(n)


def from_task_pairs(clean, corrupt=None, answer=None, wrong=None):
    """`clean` as given, or, when it is task pairs (with lists `clean`, `corrupt` and optionally
    `answer`, `wrong`), its prompts, with the other arguments defaulting to its lists."""
    if not (hasattr(clean, "clean") and hasattr(clean, "corrupt")):
        return clean, corrupt, answer, wrong
    task = clean
    return (task.clean, task.corrupt if corrupt is None else corrupt,
            getattr(task, "answer", None) if answer is None else answer,
            getattr(task, "wrong", None) if wrong is None else wrong)


def unpack(clean, corrupt=None, answer=None, wrong=None):
    """Clean and corrupt prompts as two lists of equal length, and the answer / wrong tokens."""
    clean, corrupt, answer, wrong = from_task_pairs(clean, corrupt, answer, wrong)
    if corrupt is None:
        raise NNPatchTypeError("patching needs corrupt prompts: pass corrupt=..., or task pairs (an object "
                               "with clean, corrupt, answer and wrong lists, e.g. nnpatch.tasks.ioi(8))")
    clean, corrupt = as_list(clean), as_list(corrupt)
    if len(clean) != len(corrupt):
        raise NNPatchValueError(f"{len(clean)} clean prompts but {len(corrupt)} corrupt prompts; give one "
                                "corrupt prompt per clean prompt")
    if not clean:
        raise NNPatchValueError("no prompts given")
    return clean, corrupt, answer, wrong


def as_list(prompts) -> list:
    """A list with one entry per prompt, whatever form the prompts came in."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        return [row.tolist() for row in (prompts if prompts.dim() == 2 else prompts.reshape(1, -1))]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    return list(prompts)


def pair_dicts(pairs) -> list[dict]:
    """Prompt pairs as dicts with clean, corrupt, answer, wrong ("" where a pair has none).

    Takes `nnpatch.tasks` pairs, objects or dicts with those fields, or (clean, corrupt[, answer,
    wrong]) tuples."""
    out = []
    for i, p in enumerate(pairs or []):
        if isinstance(p, (tuple, list)) and 2 <= len(p) <= 4 and all(isinstance(x, str) for x in p):
            fields = dict(zip(FIELDS, p))
        elif isinstance(p, dict):
            fields = p
        else:
            fields = {k: getattr(p, k, None) for k in FIELDS}
        if not isinstance(fields.get("clean"), str) or not isinstance(fields.get("corrupt"), str):
            raise NNPatchValueError(f"pair {i} has no clean and corrupt prompt: give pairs as nnpatch.tasks "
                                    "pairs, dicts, or (clean, corrupt[, answer, wrong]) tuples")
        out.append({k: fields.get(k) or "" for k in FIELDS})
    return out
