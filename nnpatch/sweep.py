"""`nnpatch.sweep`: the patching entry points under the name the tutorials use.

    >>> from nnpatch.sweep import patch_cells, activation_patching
"""
from .patching.api import PatchedRun, activation_patching, attribution_patching, patch_cells
from .patching.metrics import METRICS, score

__all__ = ["activation_patching", "attribution_patching", "patch_cells", "PatchedRun", "score", "METRICS"]
