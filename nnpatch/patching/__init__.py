"""Patching: standard sites, metrics, prompt pairs and batched sweeps, on top of the engine.

Reading order: `api` (the entry points), `job` (inputs checked, cells enumerated), `runner`
(batched runs and their hooks), `metrics`, `pairs`, `sites`, `result`; then what a heatmap leads
to: `inspect` (attention patterns, heads' direct logit attribution, the logit lens) and `noise`
(causal tracing with noise on the subject's embeddings). Nothing here imports
IPython, ipywidgets or plotly (`nnpatch.sites(model)` is `sites.sites`); `PatchingResult.plot()` is the one call up into `nnpatch.jupyter`.
"""
from .api import PatchedRun, activation_patching, attribution_patching, patch_cells
from .metrics import METRICS, score
from .result import PatchingResult
from .sites import Site, Sites, register_sites

__all__ = ["activation_patching", "attribution_patching", "patch_cells", "PatchedRun", "PatchingResult",
           "score", "METRICS", "register_sites", "Site", "Sites"]
