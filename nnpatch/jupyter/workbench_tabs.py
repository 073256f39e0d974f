"""The workbench's extra tabs: what a researcher opens after the heatmap.

* **Head**: the inspected head's attention pattern on the clean and the corrupt prompt, and every
  head's direct logit attribution to answer - wrong (`attention_pattern`, `head_logit_attribution`).
* **Logit lens**: top token and the answer's probability per layer and position for the clean and
  corrupt runs and the patched run of the inspected cell (`logit_lens`).
* **Noise**: causal tracing with noise on the subject tokens (`noise_patching`) beside the last
  run, which corrupts with the corrupt prompt.
* **Sites**: resid_pre, attn_out and mlp_out swept side by side (`activation_patching`).

`add_all(wb)` makes the four panels and registers them with a workbench that has
`add_tab(title, widget)`, `on_run(callback())` and `on_inspect(callback(cell, settings))` and a
`controller` (`WorkbenchController`). Each panel computes with nnpatch's public API only (one
`*_view` function per panel, testable without a browser) and draws with `inspect_plots`.

    >>> import nnpatch
    >>> from nnpatch.jupyter import workbench_tabs
    >>> workbench_tabs.add_all(nnpatch.Workbench(nnpatch.models.load("ioi")))  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import html
import time
from dataclasses import dataclass

import ipywidgets
import plotly.graph_objects as go

from ..errors import NNPatchError, NNPatchValueError
from ..patching import activation_patching
from ..patching.inspect import AttentionPattern, LogitLens, attention_pattern, head_logit_attribution, logit_lens
from ..patching.noise import NOISE_STDS, NoisePatchingResult, default_noise, noise_patching
from . import heatmap, inspect_plots
from .figures import CONFIG, template

SITES = ("resid_pre", "attn_out", "mlp_out")
DENOISE_NOTE = ("<b>denoise</b>: each cell's clean activation is put into the corrupted run (noise on the "
                "subject, or the corrupt prompt); 1 means that cell alone brings the clean answer back. "
                "<b>noise</b>: each cell's corrupted activation is put into the clean run; 0 means the clean "
                "answer needs that cell.")


def add_all(wb) -> dict[str, ipywidgets.Widget]:
    """Make the Head, Logit lens, Noise and Sites tabs of workbench `wb` and register them.

    When the workbench shows its tabs in an `ipywidgets.Tab` (`wb.tabs`), a tab that is not on
    screen keeps only the latest run or inspected cell and computes it when it is selected, so a
    Run or a click costs only the tab in view."""
    ctl = wb.controller
    panels = {"Head": HeadPanel(ctl), "Logit lens": LensPanel(ctl), "Noise": NoisePanel(ctl), "Sites": SitesPanel(ctl)}
    for title, panel in panels.items():
        wb.add_tab(title, panel)
    tabs = getattr(wb, "tabs", None)
    tabs = tabs if isinstance(tabs, ipywidgets.Tab) else None

    def shown(panel) -> bool:
        return tabs is None or panel.eager or (
            panel in tabs.children and tabs.selected_index == tabs.children.index(panel))

    def tell(run: bool, cell=None):
        for panel in panels.values():
            panel.pending = (True, cell) if run else (panel.pending[0], cell)
            if shown(panel):
                panel.catch_up()

    wb.on_inspect(lambda cell, settings: tell(False, (tuple(cell), settings)))
    wb.on_run(lambda: tell(True))
    if tabs is not None:
        def selected(change):
            for panel in panels.values():
                if shown(panel):
                    panel.catch_up()
        tabs.observe(selected, names="selected_index")
    return panels


# -- what each panel shows, computed with the public API ----------------------------------------------
@dataclass
class HeadView:
    layer: int
    head: int
    clean: AttentionPattern
    corrupt: AttentionPattern
    dla_clean: object  # [layers, heads] tensor: direct effect on logit(answer) - logit(wrong)
    dla_corrupt: object


def head_view(model, settings, cell: tuple, dla: tuple | None = None) -> HeadView | None:
    """The inspected head's patterns and every head's direct logit attribution (`dla`: the clean
    and corrupt runs' attributions when already computed), or None when the cell is not a head."""
    if "head" not in settings.by:
        return None
    layer, head = cell[settings.by.index("layer")], cell[settings.by.index("head")]
    s = settings
    if dla is None:
        dla = (head_logit_attribution(model, s.clean, s.answer, s.wrong),
               head_logit_attribution(model, s.corrupt, s.answer, s.wrong))
    return HeadView(layer, head, attention_pattern(model, s.clean, layer, head),
                    attention_pattern(model, s.corrupt, layer, head), *dla)


def lens_view(model, settings, cell: tuple | None = None, runs: dict | None = None) -> dict[str, LogitLens]:
    """The lenses of the clean and corrupt runs (`runs` when already computed) and, for a cell,
    of the run that cell patched."""
    s = settings
    out = dict(runs) if runs is not None else \
        {"clean": logit_lens(model, s.clean, s.answer), "corrupt": logit_lens(model, s.corrupt, s.answer)}
    if cell is not None:
        denoise = getattr(s, "direction", "denoise") == "denoise"
        base, source = (s.corrupt, s.clean) if denoise else (s.clean, s.corrupt)
        out["patched"] = logit_lens(model, base, s.answer, patch=dict(source=source, site=s.site, cell=cell, by=s.by))
    return out


def noise_view(model, settings, subject: list[int], noise: float | None, mode: str) -> NoisePatchingResult:
    """Causal tracing of the clean prompt with the last run's site, cells and metric."""
    s = settings
    return noise_patching(model, s.clean, subject=subject, noise=noise, mode=mode, site=s.site, by=s.by,
                          answer=s.answer, wrong=s.wrong, metric=s.metric, progress=False)


def sites_view(model, settings, last=None, pairs: list[dict] | None = None) -> dict:
    """resid_pre, attn_out and mlp_out swept with the last run's prompts (or `pairs`, dicts with
    clean, corrupt, answer, wrong), tokens, metric and direction, by the run's cells (layer x pos
    for a run by head); `last` is reused where it is one of them."""
    s = settings
    by = s.by if "head" not in s.by else ("layer", "pos")
    direction = getattr(s, "direction", "denoise")
    pairs = pairs or [{"clean": s.clean, "corrupt": s.corrupt, "answer": s.answer, "wrong": s.wrong}]
    columns = {k: [p[k] for p in pairs] for k in ("clean", "corrupt", "answer", "wrong")}
    out = {}
    for site in SITES:
        if last is not None and (last.site, tuple(last.dims), last.direction, last.n_pairs) == \
                (site, tuple(by), direction, len(pairs)):
            out[site] = last
        else:
            out[site] = activation_patching(model, columns["clean"], columns["corrupt"], answer=columns["answer"],
                                            wrong=columns["wrong"], metric=s.metric, site=site, by=by,
                                            direction=direction, progress=False)
    return out


# -- the panels -----------------------------------------------------------------------------------------
class _Panel(ipywidgets.VBox):
    """A tab: a note line, controls, and figures; `update` computes and draws, reporting errors
    in the note. `seconds` is how long the last update took (compute and draw)."""

    eager = False  # computes on every run even when not on screen
    one_prompt = True  # shows one clean/corrupt pair, also after a run over all pairs (not Sites)

    def __init__(self, controller, children=()):
        self.controller = controller
        self.note = ipywidgets.HTML()
        self._theme = None  # the figures' plotly template during an update
        self.pending = (False, None)  # not shown yet: (a run?, the latest inspected (cell, settings) or None)
        self.view = None
        self.seconds: float | None = None
        self.last_error: BaseException | None = None
        super().__init__([self.note, *children], layout=ipywidgets.Layout(width="100%"))

    @property
    def theme(self):
        """The theme's template, built once per update for all its figures (given a theme name,
        each figure builds its own, tens of ms each)."""
        if self._theme is None:
            self._theme = template()
        return self._theme

    def catch_up(self) -> None:
        """Show the run and the inspected cell this panel has not shown yet."""
        (run, inspected), self.pending = self.pending, (False, None)
        if run:
            self.ran()
        if inspected is not None:
            self.inspected(*inspected)

    def inspected(self, cell, settings) -> None:
        pass

    def ran(self) -> None:
        pass

    def update(self, work) -> None:
        start = time.perf_counter()
        self.note.value = ""
        try:
            self._theme = None
            work()
            settings = self.controller.settings
            if self.one_prompt and getattr(settings, "all_pairs", False) and self.controller.pairs:
                self.note.value += _escape_html(
                    f" The heatmap is the mean over {len(self.controller.pairs)} pairs; this tab shows one "
                    "of them: the clean and corrupt prompts in the fields.")
        except NNPatchError as e:
            self.note.value = _escape_html(str(e))
        except Exception as e:  # noqa: BLE001 - a widget callback has no caller to raise to
            self.last_error = e
            self.note.value = _escape_html(f"unexpected {type(e).__name__}: {e} "
                                      "(the traceback is in the panel's last_error)")
        finally:
            self.seconds = time.perf_counter() - start


class HeadPanel(_Panel):
    def __init__(self, controller):
        self.patterns, self.dla = _figure(), _figure()
        self._dla = None  # (settings, attributions): they belong to a run, not to one head
        super().__init__(controller, [self.patterns, self.dla])
        self.note.value = "Inspect a cell of a layer × head heatmap to see that head here."

    def ran(self) -> None:
        self.view = None
        _clear(self.patterns)
        _clear(self.dla)
        self.note.value = "Inspect a cell of a layer × head heatmap to see that head here."

    def inspected(self, cell, settings) -> None:
        def work():
            known = self._dla is not None and self._dla[0] == settings
            self.view = view = head_view(self.controller.model, settings, cell, self._dla[1] if known else None)
            if view is not None:
                self._dla = (settings, (view.dla_clean, view.dla_corrupt))
            if view is None:
                self.note.value = ("Inspect a cell of a layer × head (or layer × head × pos) heatmap to see that "
                                   "head's attention and direct effect here.")
                return
            _show(self.patterns, inspect_plots.attention(
                [view.clean, view.corrupt],
                titles=[f"clean: L{view.layer}H{view.head}", f"corrupt: L{view.layer}H{view.head}"], theme=self.theme))
            _show(self.dla, inspect_plots.logit_attribution(
                view.dla_clean, answer=settings.answer, wrong=settings.wrong, mark=(view.layer, view.head),
                title=f"Direct effect of each head on logit({settings.answer!r}) - "
                      f"logit({settings.wrong!r}), clean run", theme=self.theme))
            here = (view.layer, view.head)
            self.note.value = _escape_html(
                f"Head L{view.layer}H{view.head}: direct effect on logit({settings.answer!r}) - "
                f"logit({settings.wrong!r}) {float(view.dla_clean[here]):+.3f} on the clean run, "
                f"{float(view.dla_corrupt[here]):+.3f} on the corrupt run "
                "(final norm's scale frozen at each run's value).")
        self.update(work)


class LensPanel(_Panel):
    def __init__(self, controller):
        self.figure = _figure()
        self._settings = None  # of the view's clean and corrupt lenses
        super().__init__(controller, [self.figure])
        self.note.value = "Run to see the logit lens of the clean and corrupt prompts."

    def ran(self) -> None:
        self._draw(None, self.controller.settings)

    def inspected(self, cell, settings) -> None:
        self._draw(cell, settings)

    def _draw(self, cell, settings) -> None:
        def work():
            known = self.view is not None and self._settings == settings
            runs = {k: self.view[k] for k in ("clean", "corrupt")} if known else None
            self.view = lenses = lens_view(self.controller.model, settings, cell, runs)
            self._settings = settings
            titles = {"clean": "clean", "corrupt": "corrupt"}
            if cell is not None:
                titles["patched"] = f"patched: {lenses['patched'].patch} ({getattr(settings, 'direction', 'denoise')})"
            _show(self.figure, inspect_plots.logit_lens(list(lenses.values()), titles=[titles[k] for k in lenses],
                                                             theme=self.theme))
            if cell is None:
                self.note.value = "Inspect a cell to add the lens of its patched run."
        self.update(work)


class NoisePanel(_Panel):
    eager = True  # a run only fills in the subject, which the user may edit before looking

    def __init__(self, controller):
        self.subject = ipywidgets.Text(description="subject", placeholder="token positions, e.g. 9, 10",
                                       tooltip="positions of the tokens whose input embeddings get noise")
        self.scale = ipywidgets.FloatText(description="noise std", step=0.05,
                                          tooltip=f"default: {NOISE_STDS:g} × the std of the embedding matrix")
        self.mode = ipywidgets.ToggleButtons(options=["denoise", "noise"], value="denoise",
                                             tooltips=["clean activations into the noisy run",
                                                       "noisy activations into the clean run"])
        self.button = ipywidgets.Button(description="Run noise", button_style="primary",
                                        tooltip="causal tracing with the last run's prompt, site and cells")
        self.button.on_click(lambda _: self.run())
        self.figure = _figure()
        explain = ipywidgets.HTML(DENOISE_NOTE)
        super().__init__(controller, [explain, ipywidgets.HBox([self.subject, self.scale]),
                                      ipywidgets.HBox([self.mode, self.button]), self.figure])
        default = default_noise(controller.model.module)
        if default is not None:  # a model without input embeddings gets noise_patching's error on Run
            self.scale.value = round(default, 4)
        self.note.value = "Run the heatmap first; then Run noise compares noise on the subject with it."

    def ran(self) -> None:
        def work():
            s = self.controller.settings
            differ = self.controller.preview(s.clean, s.corrupt).differ
            self.subject.value = ", ".join(map(str, differ))
            tokens = self.controller.model.to_str_tokens(s.clean)
            self.note.value = _escape_html(
                "Subject: the tokens where clean and corrupt differ ("
                + (", ".join(f"{tokens[p]!r} {p}" for p in differ) or "none: type positions")
                + "). Run noise to compare.")
            self.view = None
            _clear(self.figure)
        self.update(work)

    def run(self) -> None:
        def work():
            s = self.controller.settings
            if s is None:
                raise NNPatchValueError("run the heatmap first: noise patching uses its prompt, site and cells")
            subject = _positions(self.subject.value)
            self.view = result = noise_view(self.controller.model, s, subject, self.scale.value, self.mode.value)
            last = self.controller.result
            _show(self.figure, heatmap.compare(
                [result, last], titles=[f"noise on {subject} (std {result.noise:.3g}), {result.direction}",
                                        f"corrupt prompt, {last.direction}"
                                        + (f" (mean of {last.n_pairs} pairs)" if last.n_pairs > 1 else "")],
                theme=self.theme))
            self.note.value = _escape_html(f"Noise std {result.noise:.4g} on tokens {subject} of the clean prompt "
                                      f"(seed {result.seed}); clean {result.clean_score:.4g}, "
                                      f"noisy {result.corrupt_score:.4g}.")
        self.update(work)


class SitesPanel(_Panel):
    one_prompt = False  # sweeps every pair of an all-pairs run

    def __init__(self, controller):
        self.figure = _figure()
        super().__init__(controller, [self.figure])
        self.note.value = "Run to sweep resid_pre, attn_out and mlp_out side by side."

    def ran(self) -> None:
        def work():
            ctl = self.controller
            s = ctl.settings
            pairs = None
            if getattr(s, "all_pairs", False) and ctl.pairs:  # as the run did: each pair's own tokens first
                pairs = [{**p, "answer": p["answer"] or s.answer, "wrong": p["wrong"] or s.wrong} for p in ctl.pairs]
            self.view = results = sites_view(ctl.model, s, ctl.result, pairs)
            _show(self.figure, heatmap.compare(list(results.values()), titles=list(results), theme=self.theme))
            n = next(iter(results.values())).n_pairs
            dims = " × ".join(next(iter(results.values())).dims)
            self.note.value = dims + (f", mean of {n} pairs" if n > 1 else "")
        self.update(work)


# -- helpers --------------------------------------------------------------------------------------------
def _figure() -> go.FigureWidget:
    fig = go.FigureWidget(layout={"autosize": True})
    fig._config = CONFIG
    return fig


def _show(widget: go.FigureWidget, fig: go.Figure) -> None:
    """Replace a FigureWidget's content (the page applies a new layout as a relayout, which never
    removes: old shapes must go first)."""
    widget.layout.shapes = ()
    widget.data = []
    widget.add_traces(fig.data)
    widget.layout = fig.layout


def _clear(widget: go.FigureWidget) -> None:
    if widget.data:  # an empty widget stays as it is (a new layout costs tens of ms)
        _show(widget, go.Figure())


def _positions(text: str) -> list[int]:
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        positions = [int(p) for p in parts]
    except ValueError:
        raise NNPatchValueError(f"subject {text!r}: give token positions separated by commas, e.g. 9, 10") from None
    if not positions:
        raise NNPatchValueError("no subject tokens: give the positions of the tokens to add noise to, e.g. 9, 10")
    return positions


_escape_html = functools.partial(html.escape, quote=False)  # text for an HTML widget
