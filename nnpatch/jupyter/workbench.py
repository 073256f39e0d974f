"""`nnpatch.Workbench`: point-and-click activation patching in JupyterLab.

Type a clean and a corrupt prompt, click Run, read the heatmap, click a cell to see what patching
it does, select cells and patch them together, and take the experiment away as code:

    >>> import nnpatch
    >>> nnpatch.Workbench(nnpatch.models.load("ioi"), pairs=nnpatch.tasks.ioi(8))  # doctest: +SKIP

The view is three widgets in a box: `_Controls` (prompts, token preview, answer pickers, Run),
a plotly `FigureWidget` heatmap (`PatchingResult.plot()`), and `_Inspector` (a cell's detail,
the selection, the code). What they show lives in traitlets; their JavaScript (in the package's
`widgets/` folder) only reads and writes those traits. Every action goes to a
`WorkbenchController`, which checks the input and calls nnpatch's public API, so anything a button
does can be done in plain Python, and the code the app shows does exactly that.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import math
import pathlib
import time

import anywidget
import ipywidgets
import plotly.graph_objects as go
import traitlets as t

from ..errors import NNPatchError
from .controller import GRANULARITIES, Settings, WorkbenchController

_ASSETS = importlib.resources.files("nnpatch.widgets")


def _asset(name: str) -> pathlib.Path:
    return pathlib.Path(str(_ASSETS / name))


class _Controls(anywidget.AnyWidget):
    """Setting up an experiment: prompts, tokens, answer and wrong token, site, Run."""

    _esm = _asset("controls.js")
    _css = _asset("workbench.css")

    # what the user edits
    clean = t.Unicode("").tag(sync=True)
    corrupt = t.Unicode("").tag(sync=True)
    answer = t.Unicode("").tag(sync=True)
    wrong = t.Unicode("").tag(sync=True)
    granularity = t.Unicode(next(iter(GRANULARITIES))).tag(sync=True)
    site = t.Unicode("resid_pre").tag(sync=True)
    metric = t.Unicode("logit_diff").tag(sync=True)
    pair = t.Int(-1).tag(sync=True)  # index into `pairs`; -1 while the prompts are the user's own
    action = t.Dict().tag(sync=True)  # {"name": "run", "seq": n}, written by a button
    # what Python shows
    pairs = t.List().tag(sync=True)  # one label per prompt pair
    granularities = t.List(list(GRANULARITIES)).tag(sync=True)
    sites = t.List().tag(sync=True)
    metrics = t.List(["logit_diff"]).tag(sync=True)
    preview = t.Dict().tag(sync=True)  # {"clean": [token...], "corrupt": [...], "differ": [...], "warning": ""}
    answer_options = t.List().tag(sync=True)  # [[token, prob], ...] of the clean run
    wrong_options = t.List().tag(sync=True)  # [[token, prob], ...] of the corrupt run
    busy = t.Bool(False).tag(sync=True)
    progress = t.Float(0.0).tag(sync=True)  # fraction of the running sweep's patched runs done
    summary = t.Dict().tag(sync=True)  # the last run: scores, cell count, seconds
    message = t.Unicode("").tag(sync=True)  # what went wrong, in words


class _Inspector(anywidget.AnyWidget):
    """The heatmap's companion: a cell's detail, the selection and its patch, the code."""

    _esm = _asset("inspector.js")
    _css = _asset("workbench.css")

    click_mode = t.Unicode("inspect").tag(sync=True)  # what a click on a cell does: inspect | select
    action = t.Dict().tag(sync=True)  # {"name": "patch" | "clear" | "code" | "toggle", "cell": [..], "seq": n}
    ready = t.Bool(False).tag(sync=True)  # a heatmap exists
    detail = t.Dict().tag(sync=True)  # the inspected cell's outcome
    selection = t.List().tag(sync=True)  # [{"cell": [i, j], "label": "..."}]
    combined = t.Dict().tag(sync=True)  # the outcome of patching the selection together
    code = t.Unicode("").tag(sync=True)
    busy = t.Bool(False).tag(sync=True)
    message = t.Unicode("").tag(sync=True)


class Workbench(ipywidgets.VBox):
    """Point-and-click activation patching on `model` (an `nnpatch.LanguageModel`, a Hugging Face
    causal LM or a local folder). `pairs` (e.g. `nnpatch.tasks.ioi(8)`, or (clean, corrupt[, answer,
    wrong]) tuples) fill a picker of ready-made experiments.

    Display it as the last line of a cell. `wb.controller` holds the experiment (`.result` is the
    last `PatchingResult`); `wb.last_error` keeps the last unexpected exception, which the app shows
    only as a one-line message.
    """

    def __init__(self, model, pairs=None):
        self.controller = WorkbenchController(model, pairs)
        self.last_error: BaseException | None = None
        self._auto = {"answer": "", "wrong": ""}  # the picks the app made itself, to replace freely
        self.controls = _Controls(pairs=[_pair_label(i, p) for i, p in enumerate(self.controller.pairs)],
                                  metrics=self.controller.metric_names())
        self.heatmap = go.FigureWidget()
        self._heatmap_box = ipywidgets.Box([self.heatmap], layout=ipywidgets.Layout(display="none"))
        self.inspector = _Inspector()
        super().__init__([self.controls, self._heatmap_box, self.inspector])
        self.add_class("nnpatch-workbench")

        self.controls.observe(self._on_prompt, names=["clean", "corrupt"])
        self.controls.observe(self._on_granularity, names="granularity")
        self.controls.observe(self._on_pair, names="pair")
        self.controls.observe(self._on_controls_action, names="action")
        self.inspector.observe(self._on_inspector_action, names="action")

        if self.controller.pairs:
            self.controls.pair = 0
        self._on_granularity()  # last, so that a model without standard sites says so at once

    # -- setting up ------------------------------------------------------------------------------
    def _on_prompt(self, change=None):
        c = self.controls
        with self._reporting(c, busy=False):
            preview = self.controller.preview(c.clean, c.corrupt)
            c.preview = {"clean": [dataclasses.asdict(x) for x in preview.clean],
                         "corrupt": [dataclasses.asdict(x) for x in preview.corrupt],
                         "differ": preview.differ, "warning": preview.warning}
            c.answer_options = [list(x) for x in self.controller.predictions(c.clean)]
            c.wrong_options = [list(x) for x in self.controller.predictions(c.corrupt)]
            answer, wrong = self.controller.suggest(c.clean, c.corrupt)
            for name, value in (("answer", answer), ("wrong", wrong)):
                if getattr(c, name) in ("", self._auto[name]):
                    setattr(c, name, value)
                    self._auto[name] = value

    def _on_granularity(self, change=None):
        c = self.controls
        with self._reporting(c, busy=False):
            c.sites = self.controller.site_names(GRANULARITIES[c.granularity])
            if c.site not in c.sites and c.sites:
                c.site = c.sites[0]

    def _on_pair(self, change):
        c, pair = self.controls, self.controller.pairs[change["new"]] if change["new"] >= 0 else None
        if pair is None:
            return
        with c.hold_trait_notifications():
            c.clean, c.corrupt = pair["clean"], pair["corrupt"]
        # The pair's own tokens are a choice, like the user's: later prompt edits keep them.
        c.answer = pair["answer"] or c.answer
        c.wrong = pair["wrong"] or c.wrong
        self._auto = {"answer": "" if pair["answer"] else c.answer, "wrong": "" if pair["wrong"] else c.wrong}

    # -- running -----------------------------------------------------------------------------------
    def _on_controls_action(self, change):
        if change["new"].get("name") == "run":
            self.run()

    def run(self):
        """Run the sweep with the settings on screen (what the Run button does)."""
        c = self.controls
        with self._reporting(c):
            settings = Settings(c.clean, c.corrupt, c.answer, c.wrong, site=c.site,
                                by=GRANULARITIES.get(c.granularity, ()), metric=c.metric)
            start = time.perf_counter()
            result = self.controller.run(settings, progress=self._report_progress)
            seconds = time.perf_counter() - start
            self._show_heatmap(new=True)
            c.summary = _json_safe({"clean_score": float(result.clean_score), "corrupt_score": float(result.corrupt_score),
                                    "cells": int(result.values.numel()), "seconds": seconds, "metric": settings.metric})
            i = self.inspector
            i.ready, i.detail, i.selection, i.combined, i.code, i.message = True, {}, [], {}, "", ""

    def _report_progress(self, done: int, total: int) -> None:
        # Trait changes reach the browser while the kernel is still busy with the sweep.
        self.controls.progress = done / total if total else 0.0

    def _show_heatmap(self, new: bool = False):
        fig = self.controller.figure()
        if new:
            # The page applies a new layout as a relayout, which adds and changes but never
            # removes: the old boxes must go first.
            self.heatmap.layout.shapes = ()
            self.heatmap.data = []
            self.heatmap.add_traces(fig.data)
            self.heatmap.layout = fig.layout
            for trace in self.heatmap.data:
                trace.on_click(self._on_cell_click)
            self._heatmap_box.layout.display = None
        else:
            self.heatmap.layout.shapes = fig.layout.shapes

    # -- cells ---------------------------------------------------------------------------------
    def _on_cell_click(self, trace, points, state):
        if not points.point_inds:
            return
        cell = tuple(points.point_inds[0])  # a heatmap point is (row, col)
        if self.inspector.click_mode == "select" or (state is not None and state.shift):
            self.toggle(cell)
        else:
            self.inspect(cell)

    def inspect(self, cell):
        """Show what patching `cell` alone does (what a click on the heatmap does)."""
        with self._reporting(self.inspector):
            self.inspector.detail = self._outcome_view(self.controller.inspect(tuple(cell)))
            self._show_heatmap()
            self._refresh_code()

    def toggle(self, cell):
        """Add `cell` to the selection, or take it out (a click in select mode, or shift-click)."""
        with self._reporting(self.inspector):
            self.controller.toggle(tuple(cell))
            self._show_selection()

    def patch_selected(self):
        """Patch the selected cells together and show the outcome ("Patch selected")."""
        with self._reporting(self.inspector):
            self.inspector.combined = self._outcome_view(self.controller.patch_selected())

    def _on_inspector_action(self, change):
        action = change["new"]
        name = action.get("name")
        if name == "patch":
            self.patch_selected()
        elif name == "toggle":
            self.toggle(action.get("cell", ()))
        elif name == "clear":
            with self._reporting(self.inspector):
                self.controller.clear_selection()
                self._show_selection()
        elif name == "code":
            with self._reporting(self.inspector):
                self.inspector.code = self.controller.code()

    def _show_selection(self):
        ctl = self.controller
        self.inspector.selection = [{"cell": list(c), "label": ctl.label(c)} for c in ctl.selection]
        self.inspector.combined = {}
        self._show_heatmap()
        self._refresh_code()

    def _refresh_code(self):
        """Code on screen always matches the numbers on screen."""
        if self.inspector.code:
            self.inspector.code = self.controller.code()

    def _outcome_view(self, outcome) -> dict:
        s = self.controller.settings
        view = dataclasses.asdict(outcome)
        view["cells"] = [list(c) for c in outcome.cells]
        view["top"] = {run: [list(x) for x in top] for run, top in outcome.top.items()}
        view.update(answer=s.answer, wrong=s.wrong, metric=s.metric)
        return _json_safe(view)

    # -- messages instead of tracebacks ----------------------------------------------------------
    @contextlib.contextmanager
    def _reporting(self, panel, busy: bool = True):
        """Show what goes wrong inside the block as a message on `panel`; never let it escape,
        so that a bad input leaves the app usable."""
        panel.message = ""
        panel.busy = busy
        try:
            yield
        except NNPatchError as e:
            panel.message = str(e)
        except Exception as e:  # noqa: BLE001 - a widget callback has no caller to raise to
            self.last_error = e
            panel.message = (f"unexpected {type(e).__name__}: {e} "
                             "(the traceback is in the Workbench's last_error)")
        finally:
            panel.busy = False


def _json_safe(value):
    """`value` with NaN and infinities as None: the comm's JSON has no NaN (the view shows "–")."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _pair_label(i: int, pair: dict) -> str:
    text = pair["clean"] if len(pair["clean"]) <= 70 else pair["clean"][:67] + "..."
    return f"{i + 1}: {text}"
