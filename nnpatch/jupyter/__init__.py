"""What a person sees: heatmaps (plotly figures), the IPython magics and the patching workbench.

Everything here calls the public API of `nnpatch.patching` and `nnpatch.engine`; nothing below
imports this layer (except `PatchingResult.plot()`, which draws with `heatmap.plot`).
"""
