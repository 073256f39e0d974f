"""nnpatch: causal interventions on PyTorch and Hugging Face models.

    >>> import nnpatch
    >>> model = nnpatch.models.load("ioi")                      # a bundled demo model
    >>> with model.trace("When Mary and John went to the store, John gave a drink to"):
    ...     hidden = model.transformer.h[1].output[0].save()

Three layers, importing one way: `nnpatch.engine` (traces) <- `nnpatch.patching` (sites,
metrics, sweeps) <- `nnpatch.jupyter` (plots, magics, the workbench); see docs/architecture.md.
"""
import importlib

from .engine import LanguageModel, Model
from .errors import NNPatchError

__all__ = [
    "Model", "LanguageModel", "NNPatchError",
    "sites", "register_sites", "activation_patching", "attribution_patching", "PatchingResult",
    "Workbench", "models", "tasks", "heatmap",
    "graph", "register_graph", "path_patching", "edge_attribution", "evaluate_circuit", "smallest_circuit", "Circuit",
    "circuit_plot", "attention_pattern", "head_logit_attribution", "logit_lens", "noise_patching",
]

# Everything beyond the engine loads on first use, so `import nnpatch` stays light and the
# engine never pulls in plotly or widget libraries.
_LAZY = {
    "sites": ("nnpatch.patching.sites", "sites"),
    "register_sites": ("nnpatch.patching.sites", "register_sites"),
    "activation_patching": ("nnpatch.patching.api", "activation_patching"),
    "attribution_patching": ("nnpatch.patching.api", "attribution_patching"),
    "PatchingResult": ("nnpatch.patching.result", "PatchingResult"),
    "graph": ("nnpatch.patching.graph", "graph"),
    "register_graph": ("nnpatch.patching.graph", "register_graph"),
    "path_patching": ("nnpatch.patching.path_patching", "path_patching"),
    "edge_attribution": ("nnpatch.patching.edge_attribution", "edge_attribution"),
    "evaluate_circuit": ("nnpatch.patching.faithfulness", "evaluate_circuit"),
    "smallest_circuit": ("nnpatch.patching.faithfulness", "smallest_circuit"),
    "Circuit": ("nnpatch.patching.circuit", "Circuit"),
    "attention_pattern": ("nnpatch.patching.inspect", "attention_pattern"),
    "head_logit_attribution": ("nnpatch.patching.inspect", "head_logit_attribution"),
    "logit_lens": ("nnpatch.patching.inspect", "logit_lens"),
    "noise_patching": ("nnpatch.patching.noise", "noise_patching"),
    "Workbench": ("nnpatch.jupyter.workbench", "Workbench"),
    "sweep": ("nnpatch.sweep", None),
    "heatmap": ("nnpatch.jupyter.heatmap", None),
    "circuit_plot": ("nnpatch.jupyter.circuit_plot", None),
    "models": ("nnpatch.models", None),
    "tasks": ("nnpatch.bundled.tasks", None),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'nnpatch' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)


def load_ipython_extension(ipython):
    """`%load_ext nnpatch` registers the %%trace, %%patch and %patch_sweep magics."""
    from .jupyter.magics import load_ipython_extension as load
    load(ipython)
