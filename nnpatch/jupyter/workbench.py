"""`nnpatch.Workbench`: point-and-click activation patching in JupyterLab.

Type a clean and a corrupt prompt (or pick an example, or all of them), click Run, read the
heatmap, click a cell to see what patching it does, select cells and patch them together, go back
and forth through the session's runs, and take the experiment away as code:

    >>> import nnpatch
    >>> nnpatch.Workbench(nnpatch.models.load("ioi"), pairs=nnpatch.tasks.ioi(8))  # doctest: +SKIP

The view is `_Controls` (prompts, token preview, answer pickers, Run, history) above a tab bar;
its first tab, "Patching", holds the plotly `FigureWidget` heatmap beside `_Inspector` (a cell's
detail, the selection, the code), and below them a second figure for comparisons and per-pair
views. Other tabs join with `add_tab`, and hear of runs and inspected cells through `on_run` and
`on_inspect`. What the widgets show lives in traitlets; their JavaScript (in the package's
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
from typing import Callable

import anywidget
import ipywidgets
import plotly.graph_objects as go
import traitlets as t

from ..errors import NNPatchError
from . import heatmap as _heatmap
from . import workbench_tabs
from .circuit_panel import CircuitPanel
from .controller import DIRECTIONS, GRANULARITIES, Settings, WorkbenchController

_ASSETS = importlib.resources.files("nnpatch.widgets")
ALL_PAIRS = -2  # the pair picker's "all pairs (mean)" entry; -1 is the user's own prompts
INPUTS = ("clean", "corrupt", "answer", "wrong", "granularity", "site", "metric", "direction", "pair")


def _asset(name: str) -> pathlib.Path:
    return pathlib.Path(str(_ASSETS / name))


class _Controls(anywidget.AnyWidget):
    """Setting up an experiment: prompts, tokens, answer and wrong token, site, Run, history."""

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
    direction = t.Unicode("denoise").tag(sync=True)
    pair = t.Int(-1).tag(sync=True)  # index into `pairs`; -1: the user's own prompts; -2: all pairs
    action = t.Dict().tag(sync=True)  # {"name": "run" | "back" | "forward" | "compare" | ..., "seq": n}
    theme = t.Unicode("light").tag(sync=True)  # JupyterLab's theme, as the page reports it
    # what Python shows
    pairs = t.List().tag(sync=True)  # one label per prompt pair
    granularities = t.List(list(GRANULARITIES)).tag(sync=True)
    sites = t.List().tag(sync=True)
    metrics = t.List(["logit_diff"]).tag(sync=True)
    directions = t.Dict(DIRECTIONS).tag(sync=True)  # direction -> what it means
    preview = t.Dict().tag(sync=True)  # {"clean": [token...], "corrupt": [...], "differ": [...], "warning": ""}
    answer_options = t.List().tag(sync=True)  # [[token, prob], ...] of the clean run
    wrong_options = t.List().tag(sync=True)  # [[token, prob], ...] of the corrupt run
    warning = t.Unicode("").tag(sync=True)  # e.g. the answer is not in the clean run's top-k
    busy = t.Bool(False).tag(sync=True)
    progress = t.Float(0.0).tag(sync=True)  # fraction of the running sweep's patched runs done
    summary = t.Dict().tag(sync=True)  # the shown run: scores, probabilities, cell count, seconds
    stale = t.Bool(False).tag(sync=True)  # the inputs differ from the shown run's
    history = t.Dict().tag(sync=True)  # {"index": i, "runs": [label...], "per_pair": bool, "extra": ""}
    message = t.Unicode("").tag(sync=True)  # what went wrong, in words


class _Inspector(anywidget.AnyWidget):
    """The heatmap's companion: a cell's detail, the selection and its patch, the code."""

    _esm = _asset("inspector.js")
    _css = _asset("workbench.css")

    click_mode = t.Unicode("inspect").tag(sync=True)  # what a click on a cell does: inspect | select
    action = t.Dict().tag(sync=True)  # {"name": "patch" | "clear" | "code" | "toggle", "cell": [..], "seq": n}
    ready = t.Bool(False).tag(sync=True)  # a heatmap exists
    stale = t.Bool(False).tag(sync=True)  # the inputs differ from the shown run's
    detail = t.Dict().tag(sync=True)  # the inspected cell's outcome
    selection = t.List().tag(sync=True)  # [{"cell": [i, j], "label": "..."}]
    combined = t.Dict().tag(sync=True)  # the outcome of patching the selection together
    code = t.Unicode("").tag(sync=True)
    busy = t.Bool(False).tag(sync=True)
    message = t.Unicode("").tag(sync=True)
    plot_width = t.Int(0).tag(sync=True)  # px the page gives the heatmap (0: not measured yet)
    row_width = t.Int(0).tag(sync=True)  # px of the heatmap and inspector's row, for the second figure


class Workbench(ipywidgets.VBox):
    """Point-and-click activation patching on `model` (an `nnpatch.LanguageModel`, a Hugging Face
    causal LM or a local folder). `pairs` (e.g. `nnpatch.tasks.ioi(8)`, or (clean, corrupt[, answer,
    wrong]) tuples) fill a picker of ready-made experiments, and its "all pairs (mean)" entry
    sweeps them all.

    Display it as the last line of a cell. `wb.controller` holds the experiment (`.result` is the
    shown `PatchingResult`, `.history` every run); `wb.last_error` keeps the last unexpected
    exception, which the app shows only as a one-line message.
    """

    def __init__(self, model, pairs=None):
        self.controller = WorkbenchController(model, pairs)
        self.last_error: BaseException | None = None
        self._origin = {"answer": "auto", "wrong": "auto"}  # who picked each token: auto | pair | user
        self._writing = False  # True while Python itself sets the inputs
        self._run_callbacks: list[Callable[[], None]] = []
        self._inspect_callbacks: list[Callable[[tuple, Settings], None]] = []
        self.controls = _Controls(pairs=[_pair_label(i, p) for i, p in enumerate(self.controller.pairs)],
                                  metrics=self.controller.metric_names())
        self.heatmap = go.FigureWidget()
        self.heatmap._config = _config()
        self.extra = go.FigureWidget()  # a comparison of runs, or one small heatmap per pair
        self.extra._config = _config()
        self.inspector = _Inspector()
        self._heatmap_box = ipywidgets.Box([self.heatmap], layout=ipywidgets.Layout(
            display="none", flex="1 1 560px", min_width="420px", overflow="hidden"))
        self.inspector.layout = ipywidgets.Layout(flex="1 1 380px", min_width="340px")
        side_by_side = ipywidgets.Box([self._heatmap_box, self.inspector], layout=ipywidgets.Layout(
            display="flex", flex_flow="row wrap", align_items="flex-start", width="100%"))
        side_by_side.add_class("nnp-patching")
        # The second figure joins the page when first needed, so that the heatmap is the page's one plot till then.
        self._extra_box = ipywidgets.Box([], layout=ipywidgets.Layout(display="none", width="100%"))
        self.tabs = ipywidgets.Tab([ipywidgets.VBox([side_by_side, self._extra_box])])
        self.tabs.set_title(0, "Patching")
        super().__init__([self.controls, self.tabs])
        self.add_class("nnpatch-workbench")

        self.controls.observe(self._on_prompt, names=["clean", "corrupt"])
        self.controls.observe(self._on_token, names=["answer", "wrong"])
        self.controls.observe(self._on_granularity, names="granularity")
        self.controls.observe(self._on_pair, names="pair")
        self.controls.observe(self._on_inputs, names=list(INPUTS))
        self.controls.observe(self._on_controls_action, names="action")
        self.controls.observe(self._on_theme, names="theme")
        self.inspector.observe(self._on_inspector_action, names="action")
        self.inspector.observe(self._on_width, names=["plot_width", "row_width"])

        if self.controller.pairs:
            self.controls.pair = 0
        self._on_granularity()  # so that a model without standard sites says so at once
        self.extra_tabs = workbench_tabs.add_all(self)  # Head, Logit lens, Noise, Sites
        if self.controller.pairs:
            self.circuit = CircuitPanel(self.controller.model, self.controller.pairs)
            self.add_tab("Circuit", self.circuit)

    # -- extension points ------------------------------------------------------------------------
    def add_tab(self, title: str, widget) -> None:
        """Add `widget` as a tab after "Patching" (e.g. attention patterns of the inspected head)."""
        self.tabs.children = (*self.tabs.children, widget)
        self.tabs.set_title(len(self.tabs.children) - 1, title)

    def on_run(self, callback: Callable[[], None]) -> None:
        """Call `callback()` after each successful run (read `wb.controller.result`)."""
        self._run_callbacks.append(callback)

    def on_inspect(self, callback: Callable[[tuple, Settings], None]) -> None:
        """Call `callback(cell, settings)` after a cell is inspected: `cell` indexes the result's
        dims (e.g. (layer, head, pos)), `settings` are the shown run's."""
        self._inspect_callbacks.append(callback)

    def _notify(self, panel, callbacks, *args) -> None:
        for callback in callbacks:
            try:
                callback(*args)
            except Exception as e:  # noqa: BLE001 - another tab's failure must not break this one
                self.last_error = e
                panel.message = f"{getattr(callback, '__qualname__', 'a tab')} failed: {type(e).__name__}: {e}"

    # -- setting up ------------------------------------------------------------------------------
    def settings(self) -> Settings:
        """The settings on screen (what Run would run)."""
        c = self.controls
        return Settings(c.clean, c.corrupt, c.answer, c.wrong, site=c.site, by=GRANULARITIES.get(c.granularity, ()),
                        metric=c.metric, direction=c.direction, all_pairs=c.pair == ALL_PAIRS)

    def _on_prompt(self, change=None):
        c = self.controls
        with self._reporting(c, busy=False):
            preview = self.controller.preview(c.clean, c.corrupt)
            c.preview = {"clean": [dataclasses.asdict(x) for x in preview.clean],
                         "corrupt": [dataclasses.asdict(x) for x in preview.corrupt],
                         "differ": preview.differ, "warning": preview.warning}
            c.answer_options = [list(x) for x in self.controller.predictions(c.clean)]
            c.wrong_options = [list(x) for x in self.controller.predictions(c.corrupt)]
            if not self._writing:
                answer, wrong = self.controller.fit(c.clean, c.corrupt, c.answer, c.wrong, self._origin)
                self._write(answer=answer, wrong=wrong)

    def _on_token(self, change):
        if not self._writing:  # the user typed or picked it
            self._origin[change["name"]] = "user" if change["new"] else "auto"

    def _on_granularity(self, change=None):
        c = self.controls
        with self._reporting(c, busy=False):
            c.sites = self.controller.site_names(GRANULARITIES[c.granularity])
            if c.site not in c.sites and c.sites:
                c.site = c.sites[0]

    def _on_pair(self, change):
        index = change["new"]
        if index == -1 or not self.controller.pairs:
            return
        pair = self.controller.pairs[max(index, 0)]  # all pairs: the fields show the first
        # The pair's own tokens are kept while they fit the prompts; the app fills what it lacks.
        self._origin = {name: "pair" if pair[name] else "auto" for name in ("answer", "wrong")}
        answer, wrong = self.controller.fit(pair["clean"], pair["corrupt"], pair["answer"], pair["wrong"], self._origin)
        # One update: tokens arriving after the prompts would overwrite what the user typed meanwhile.
        self._write(clean=pair["clean"], corrupt=pair["corrupt"], answer=answer, wrong=wrong)

    def _write(self, **values):
        """Set inputs from Python: the token pickers do not take it for the user's choice."""
        self._writing = True
        try:  # hold_sync: the page gets the values in one message
            with self.controls.hold_sync(), self.controls.hold_trait_notifications():
                for name, value in values.items():
                    setattr(self.controls, name, value)
        finally:
            self._writing = False

    def _on_inputs(self, change=None):
        """Any input changed: mark the shown run out of date if it no longer matches, and warn
        about an answer the model does not predict."""
        c = self.controls
        settings = self.settings()
        stale = self.controller.edit(settings)
        c.stale = self.inspector.stale = stale
        for box in (self._heatmap_box, self._extra_box):
            (box.add_class if stale else box.remove_class)("nnp-stale")
        try:
            c.warning = self.controller.warning(settings)
        except NNPatchError:
            c.warning = ""  # e.g. all pairs without pairs: Run says why

    def _on_width(self, change=None):
        """The figures follow the width the page measured (see inspector.js)."""
        i = self.inspector
        if self.heatmap.data and i.plot_width:
            self.heatmap.layout.width = i.plot_width
        if self.extra.data and i.row_width:
            self.extra.layout.width = i.row_width

    def _on_theme(self, change):
        self.controller.theme = "dark" if change["new"] == "dark" else "light"
        if self.controller.result is not None:
            with self._reporting(self.inspector, busy=False):
                self._show_heatmap(new=True)

    # -- running -----------------------------------------------------------------------------------
    def _on_controls_action(self, change):
        action = change["new"]
        name = action.get("name")
        if name == "run":
            self.run()
        elif name in ("back", "forward"):
            self.go(name)
        elif name == "compare":
            self.compare(int(action.get("other", -1)))
        elif name == "per_pair":
            self.show_pairs()
        elif name == "hide_extra":
            self._show_extra(None, "")

    def run(self):
        """Run the sweep with the settings on screen (what the Run button does)."""
        c = self.controls
        with self._reporting(c):
            self.controller.run(self.settings(), progress=self._report_progress)
            self._show_run()
        if self.controller.history.current is not None and not c.message:
            self._notify(c, self._run_callbacks)

    def go(self, where: str):
        """Show the run before ("back") or after ("forward") this one, with its inputs."""
        with self._reporting(self.controls, busy=False):
            run = self.controller.back() if where == "back" else self.controller.forward()
            s = run.settings
            pair = ALL_PAIRS if s.all_pairs else next(
                (i for i, p in enumerate(self.controller.pairs) if (p["clean"], p["corrupt"]) == (s.clean, s.corrupt)), -1)
            granularity = next(k for k, v in GRANULARITIES.items() if v == s.by)
            self._write(pair=pair, granularity=granularity)
            self._write(clean=s.clean, corrupt=s.corrupt, answer=s.answer, wrong=s.wrong, site=s.site,
                        metric=s.metric, direction=s.direction)
            self._on_inputs()
            self._show_run()

    def compare(self, other: int):
        """Show the shown run and run `other` (0-based) side by side ("Compare")."""
        with self._reporting(self.controls, busy=False):
            self._show_extra(self.controller.compare(other), "compare")

    def show_pairs(self):
        """One small heatmap per pair of a run over all pairs ("Per pair")."""
        with self._reporting(self.controls, busy=False):
            self._show_extra(self.controller.pair_figure(), "pairs")

    def _show_run(self):
        ctl, c, i = self.controller, self.controls, self.inspector
        run = ctl.history.current
        # The summary changes last: a page that waits for it finds everything else already new.
        i.ready, i.detail, i.selection, i.combined, i.code, i.message = True, {}, [], {}, "", ""
        self._show_heatmap(new=True)
        self._show_extra(None, "")
        c.stale = i.stale = ctl.stale
        for box in (self._heatmap_box, self._extra_box):
            box.remove_class("nnp-stale")
        result = run.result
        c.summary = _json_safe({"clean_score": float(result.clean_score), "corrupt_score": float(result.corrupt_score),
                                "cells": int(result.values.numel()), "seconds": run.seconds, "metric": run.settings.metric,
                                "pairs": len(run.per_pair) or 1, "probs": ctl.probabilities(run.settings),
                                "answer": run.settings.answer, "wrong": run.settings.wrong})

    def _show_history(self, extra: str = ""):
        h = self.controller.history
        self.controls.history = {"index": h.index, "runs": [_run_label(k, r.settings) for k, r in enumerate(h.runs)],
                                 "per_pair": bool(h.current and h.current.per_pair), "extra": extra}

    def _show_extra(self, fig, kind: str):
        self.extra.data = []
        if fig is not None:
            self._extra_box.children = (self.extra,)
            self.extra.layout = {}
            self.extra.add_traces(fig.data)
            self.extra.layout = fig.layout
            self.extra.layout.width = self.inspector.row_width or None
        self._extra_box.layout.display = None if fig is not None else "none"
        self._show_history(kind)

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
            self.heatmap.layout.width = self.inspector.plot_width or None
            for trace in self.heatmap.data:
                trace.on_click(self._on_cell_click)
            self._heatmap_box.layout.display = None
        else:
            self.heatmap.layout.shapes = fig.layout.shapes

    # -- cells ---------------------------------------------------------------------------------
    def _on_cell_click(self, trace, points, state):
        if not points.point_inds:
            return
        with self._reporting(self.inspector, busy=False):
            cell = self.controller.cell(*points.point_inds[0])  # a heatmap point is (row, col)
        if self.inspector.message:
            return
        if self.inspector.click_mode == "select" or (state is not None and state.shift):
            self.toggle(cell)
        else:
            self.inspect(cell)

    def inspect(self, cell):
        """Show what patching `cell` (indices along the result's dims) alone does (a click)."""
        with self._reporting(self.inspector):
            outcome = self.controller.inspect(tuple(cell))
            self.inspector.detail = self._outcome_view(outcome)
            self._show_heatmap()
            self._refresh_code()
        if not self.inspector.message:
            self._notify(self.inspector, self._inspect_callbacks, outcome.cells[0], self.controller.settings)

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
        view.update(answer="" if s.all_pairs else s.answer, wrong="" if s.all_pairs else s.wrong, metric=s.metric)
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


def _config() -> dict:
    """The figures' plotly config: resize with the page; no logo or cloud buttons."""
    return {**_heatmap.CONFIG, "responsive": True}


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


def _run_label(i: int, s: Settings) -> str:
    what = "all pairs" if s.all_pairs else (s.clean if len(s.clean) <= 40 else "..." + s.clean[-37:])
    return f"run {i + 1}: {s.site} by {' × '.join(s.by)}, {s.direction}, {what}"
