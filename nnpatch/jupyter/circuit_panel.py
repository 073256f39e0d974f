"""The circuit panel: run EAP / EAP-IG, slide a threshold, see the circuit and its faithfulness,
click an edge to patch it alone, and show the code for all of it.

A standalone ipywidgets view (it displays on its own, and the workbench can hold it as a tab) over
`CircuitController`, which holds the logic and calls only nnpatch's public API. The graph is a
plotly `FigureWidget`; clicking an edge's midpoint selects it.

    >>> import nnpatch
    >>> from nnpatch.jupyter.circuit_panel import CircuitPanel
    >>> panel = CircuitPanel(nnpatch.models.load("ioi"), nnpatch.tasks.ioi(4, template=0))
    >>> panel.run_button.click()           # EAP on all pairs; the first threshold keeps 30 edges
    >>> panel.summary.value.startswith("<b>30 edges</b>")
    True
"""
from __future__ import annotations

import html

import ipywidgets as widgets
import plotly.graph_objects as go

from . import circuit_plot
from .circuit_controller import CircuitController


class CircuitPanel(widgets.VBox):
    def __init__(self, model, pairs, *, metric: str = "logit_diff"):
        self.controller = CircuitController(model, pairs, metric=metric)
        ctl = self.controller
        self.method = widgets.Dropdown(options=[("EAP", "eap"), ("EAP-IG", "eap-ig")], value="eap",
                                       description="method")
        self.steps = widgets.IntSlider(value=5, min=1, max=20, description="IG steps")
        self.scope = widgets.ToggleButtons(options=[("whole task", "task"), ("one pair", "pair")], value="task")
        self.pair = widgets.Dropdown(options=[(p["clean"], i) for i, p in enumerate(ctl.pairs)], value=0,
                                     description="pair", layout=widgets.Layout(width="95%"))
        self.run_button = widgets.Button(description="Run", button_style="primary")
        self.threshold = widgets.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.001, readout_format=".4g",
                                             description="|score| >=", continuous_update=False, disabled=True,
                                             layout=widgets.Layout(width="95%"))
        self.summary = widgets.HTML()
        self.edge = widgets.Dropdown(options=[], description="edge")
        self.patch_button = widgets.Button(description="Patch this edge alone", disabled=True)
        self.edge_info = widgets.HTML()
        self.show_code = widgets.ToggleButton(description="Show code", value=False)
        self.code = widgets.Textarea(layout=widgets.Layout(width="95%", height="180px", display="none"))
        self.graph = go.FigureWidget()
        self.graph._config = circuit_plot.CONFIG  # the widget's plotly config: no logo, no cloud buttons

        self.run_button.on_click(lambda _: self._run())
        self.threshold.observe(lambda ch: self._threshold(ch["new"]), names="value")
        self.patch_button.on_click(lambda _: self._select(self.edge.value))
        self.show_code.observe(lambda ch: self._code(), names="value")
        super().__init__([
            widgets.HBox([self.method, self.steps]), widgets.HBox([self.scope, self.run_button]), self.pair,
            self.threshold, self.summary, self.graph, widgets.HBox([self.edge, self.patch_button]),
            self.edge_info, self.show_code, self.code])

    # -- handlers: each calls the controller, then redraws -----------------------------------------
    def _run(self):
        self.summary.value = "<i>running ...</i>"
        view = self.controller.run(method=self.method.value, steps=self.steps.value, scope=self.scope.value,
                                   pair_index=self.pair.value)
        self._updating = True
        try:
            self.threshold.max = view.max_score
            self.threshold.step = view.max_score / 1000 or 0.001
            self.threshold.value = view.threshold
            self.threshold.disabled = False
        finally:
            self._updating = False
        self._show(view)

    def _threshold(self, value: float):
        if getattr(self, "_updating", False) or self.controller.scores is None:
            return
        self._show(self.controller.set_threshold(value))

    def _show(self, view):
        warn = f"<br><span style='color:#b00'>{html.escape(view.message)}</span>" if view.message else ""
        self.summary.value = (f"<b>{view.n_edges} edges</b>, {view.n_nodes} nodes; keeps "
                              f"<b>{view.fraction:.3f}</b> of the clean metric (normalised {view.normalized:.3f}, "
                              f"corrupt 0, clean 1){warn}")
        fig = self.controller.figure()
        with self.graph.batch_update():
            self.graph.data = []
            self.graph.add_traces(list(fig.data))
            self.graph.layout = fig.layout
        for trace in self.graph.data:
            if trace.name == "edges":
                trace.on_click(self._clicked)
        self.edge.options = [row["edge"] for row in self.controller.circuit.edges_table()]  # best first
        self.patch_button.disabled = not self.edge.options
        self._code()

    def _clicked(self, trace, points, state):
        if points.point_inds:
            edge = trace.customdata[points.point_inds[0]]
            self.edge.value = edge
            self._select(edge)

    def _select(self, edge: str | None):
        if not edge:
            return
        e = self.controller.select_edge(edge)
        self.edge_info.value = (f"<b>{html.escape(e.edge)}</b>: score {e.score:+.4g}; patched alone, the metric "
                                f"changes by {e.patched_alone:+.4g}")
        self._code()

    def _code(self):
        self.code.layout.display = "" if self.show_code.value else "none"
        self.code.value = self.controller.code()
