"""The logic of the patching workbench, with no widget library in sight.

`nnpatch.Workbench` is a thin view: it keeps what the user sees in traitlets and hands every
click to a method of `WorkbenchController`, which checks the input, calls nnpatch's public API
(`activation_patching` for the heatmap, `sweep.patch_cells` for one cell or a selection) and
returns plain data. Tests drive this class directly and compare its numbers with the API's.

The controller also keeps the session honest: `edit(settings)` tells it what is on screen, and
while that differs from the shown run (`stale`) no cell of the old heatmap can be patched. Every
run stays in `history` (back, forward, compare).

Examples:
    >>> import nnpatch
    >>> from nnpatch.jupyter.controller import Settings, WorkbenchController
    >>> ctl = WorkbenchController(nnpatch.models.load("ioi"))
    >>> clean = "When Mary and John went to the store, John gave a drink to"
    >>> corrupt = "When Mary and John went to the store, Mary gave a drink to"
    >>> result = ctl.run(Settings(clean, corrupt, answer=" Mary", wrong=" John"))
    >>> round(ctl.inspect((0, 9)).normalized, 3) == round(float(result.values[0, 9]), 3)  # S2, layer 0
    True
    >>> ctl.edit(Settings(clean, corrupt, answer=" John", wrong=" Mary"))  # inputs changed: stale
    True
    >>> print(ctl.code())                                  # doctest: +SKIP
"""
from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from .. import bundled
from ..engine import LanguageModel
from ..engine.inputs import token_id
from ..errors import NNPatchError, NNPatchIndexError, NNPatchTypeError, NNPatchValueError
from ..patching import METRICS, activation_patching, patch_cells
from ..patching.pairs import pair_dicts
from ..patching.sites import sites
from . import heatmap
from .runs import History, Progress, Run, as_grid, spread
from .workbench_inputs import TOP_K, Inputs, Preview, Token, top

Cell = tuple[int, ...]  # indices along the result's dims: (layer, pos), (layer, head) or (layer, head, pos)

GRANULARITIES = {"layer × pos": ("layer", "pos"), "layer × head": ("layer", "head"),
                 "layer × head × pos": ("layer", "head", "pos")}
DIRECTIONS = {
    "denoise": "patch clean activations into the corrupt run: a cell scores 1 when it alone restores the clean answer",
    "noise": "patch corrupt activations into the clean run: a cell scores 0 when it alone breaks the clean answer",
}
STALE = "inputs changed: Run first (the heatmap shows the last run's inputs, not the ones on screen)"
__all__ = ["WorkbenchController", "Settings", "Outcome", "Preview", "Token", "GRANULARITIES", "DIRECTIONS", "TOP_K"]


@dataclass(frozen=True)
class Settings:
    """One experiment as the user set it up: everything a run needs. With `all_pairs`, the run
    covers every pair given to the workbench (each with its own answer and wrong token; `answer`
    and `wrong` stand in for pairs without them) and `clean` / `corrupt` are not used."""

    clean: str
    corrupt: str
    answer: str
    wrong: str
    site: str = "resid_pre"
    by: tuple[str, ...] = ("layer", "pos")
    metric: str = "logit_diff"
    direction: str = "denoise"
    all_pairs: bool = False


@dataclass(frozen=True)
class Outcome:
    """What patching one cell, or a set of cells together, does to the model's answer."""

    cells: tuple[Cell, ...]
    label: str
    clean_score: float
    corrupt_score: float
    patched_score: float
    normalized: float
    heatmap_value: float | None  # the heatmap's value for a single cell, for comparison
    top: dict[str, list[tuple[str, float]]]  # "clean" / "corrupt" / "patched" -> top-k (token, prob)
    probs: dict[str, dict[str, float]]  # "clean" / "corrupt" / "patched" -> {"answer": p, "wrong": p}
    pairs: int = 1  # over how many pairs the numbers are means


class WorkbenchController:
    """Holds one model's experiment: the runs, the inspected cell and the selected cells."""

    def __init__(self, model, pairs: Iterable | None = None):
        self.model = _as_language_model(model)
        self.pairs = pair_dicts(pairs)
        self.inputs_help = Inputs(self.model)
        self.history = History()
        self.inputs: Settings | None = None  # what is on screen now (`edit`)
        self.inspected: Cell | None = None
        self.selection: list[Cell] = []
        self.theme = "light"

    @property
    def settings(self) -> Settings | None:
        """The settings of the run on screen."""
        run = self.history.current
        return run.settings if run else None

    @property
    def result(self):
        """The `PatchingResult` of the run on screen (None before the first run)."""
        run = self.history.current
        return run.result if run else None

    # -- before a run ------------------------------------------------------------------------------
    def site_names(self, by: tuple[str, ...] = ("layer", "pos")) -> list[str]:
        """The standard sites of this model that a sweep over `by` can patch."""
        return [name for name in _standard_sites(self.model) if (name == "head_out") == ("head" in by)]

    def tokens(self, prompt: str) -> list[Token]:
        return self.inputs_help.tokens(prompt)

    def preview(self, clean: str, corrupt: str) -> Preview:
        return self.inputs_help.preview(clean, corrupt)

    def metric_names(self) -> list[str]:
        return _metric_names()

    def predictions(self, prompt: str) -> list[tuple[str, float]]:  # top-k next tokens, with probabilities
        return self.inputs_help.predictions(prompt)

    def suggest(self, clean: str, corrupt: str) -> tuple[str, str]:
        return self.inputs_help.suggest(clean, corrupt)

    def fit(self, clean: str, corrupt: str, answer: str, wrong: str, origin: dict) -> tuple[str, str]:
        """Answer and wrong token for new prompts (`Inputs.fit`: typed ones stay, an example's
        stay while they fit, the app's own follow the prompts)."""
        return self.inputs_help.fit(clean, corrupt, answer, wrong, origin)

    def warning(self, s: Settings) -> str:
        """A warning about `s` that does not stop a run: the answer is not among the clean run's
        top-k next tokens (for one pair, or for some of the pairs)."""
        return self.inputs_help.answer_warning([(p["clean"], p["answer"]) for p in self._pairs_of(s)])

    def probabilities(self, s: Settings) -> dict[str, dict[str, float | None]]:
        """p(answer) and p(wrong) in the plain clean and corrupt runs, averaged over the pairs
        of `s` (each pair with its own tokens): {"answer": {"clean": p, "corrupt": p}, ...}."""
        pairs = self._pairs_of(s)
        out = {}
        for name in ("answer", "wrong"):
            out[name] = {}
            for run in ("clean", "corrupt"):
                ps = [self.inputs_help.probability(p[run], p[name]) for p in pairs]
                out[name][run] = None if None in ps else sum(ps) / len(ps)
        return out

    def edit(self, settings: Settings) -> bool:
        """Tell the controller what is on screen now; returns whether the shown run is stale."""
        self.inputs = settings
        return self.stale

    @property
    def stale(self) -> bool:
        """The inputs on screen differ from the shown run's: its numbers are not theirs."""
        return self.inputs is not None and self.settings is not None and self._used(self.inputs) != self._used(self.settings)

    def _used(self, s: Settings) -> Settings:
        """`s` without the fields its run ignores: with all pairs, the prompt fields (they show
        pair 1) and the tokens every pair has its own of."""
        if not s.all_pairs:
            return s
        own = {name: "" for name in ("answer", "wrong") if all(p[name] for p in self.pairs)}
        return replace(s, clean="", corrupt="", **own)

    # -- the heatmap -------------------------------------------------------------------------------
    def run(self, settings: Settings, progress: Callable[[int, int], None] | None = None):
        """Sweep every cell; the result becomes the heatmap and joins the history, and the cells
        inspected or selected before are forgotten. `progress(done, total)` is called as patched
        runs finish. With `settings.all_pairs`, also sweeps each pair alone for the spread."""
        self._check(settings)
        pairs = self._pairs_of(settings)
        start = time.perf_counter()
        report = Progress(progress, 1 + (len(pairs) if settings.all_pairs else 0))
        result = _activation_patching(self.model, settings, pairs, report.part(0))
        per_pair = [_activation_patching(self.model, settings, [p], report.part(i + 1))
                    for i, p in enumerate(pairs)] if settings.all_pairs else []
        self.history.add(Run(settings, result, per_pair, time.perf_counter() - start))
        self.inputs = settings
        self.inspected, self.selection = None, []
        return result

    def figure(self):
        """The heatmap of the shown run (`heatmap.plot`), following the container's width, with
        the selected cells boxed, the inspected cell outlined, and for a run over all pairs the
        spread across pairs in each cell's hover."""
        run = self._run()
        fig = _plot(run.result, self.theme)
        if run.per_pair:
            low, high, std = (_rows(x) for x in spread(run.per_pair))
            text = [[f"{len(run.per_pair)} pairs: min {a:.3f}, max {b:.3f}, std {c:.3f}"
                     for a, b, c in zip(*row)] for row in zip(low, high, std)]
            trace, template = fig.data[0], fig.data[0].hovertemplate or "%{z}<extra></extra>"
            if trace.text is not None and "%{text}" in template:  # the hover is the text: extend it
                text = [[f"{old}<br>{new}" for old, new in zip(*rows)] for rows in zip(trace.text, text)]
            else:
                trace.hovertemplate = template.replace("<extra>", "<br>%{text}<extra>", 1)
            trace.text = text
        boxes = [_box(self._point(c), "#111", "solid") for c in self.selection]
        if self.inspected is not None:
            boxes.append(_box(self._point(self.inspected), "#e8590c", "dot"))
        fig.update_layout(shapes=boxes, clickmode="event", width=None, autosize=True)
        return fig

    def cell(self, row: int, col: int) -> Cell:
        """The cell behind heatmap point (row, col) of `figure()`, checked against the result.
        For layer × head × pos the rows are (layer, head) pairs, layer-major, as heatmap.plot
        draws them."""
        result = self._result()
        shape = tuple(result.values.shape)
        rows = shape[0] * shape[1] if len(shape) == 3 else shape[0]
        if not (0 <= row < rows and 0 <= col < shape[-1]):
            raise NNPatchIndexError(f"cell ({row}, {col}) is outside the heatmap's {rows} x {shape[-1]} cells")
        if len(shape) == 3:
            return (int(row) // shape[1], int(row) % shape[1], int(col))
        return (int(row), int(col))

    def _point(self, cell: Cell) -> tuple[int, int]:
        """Heatmap point (row, col) of a result cell: `cell`'s inverse."""
        if len(cell) == 3:
            return (cell[0] * self.result.values.shape[1] + cell[1], cell[2])
        return tuple(cell)

    # -- history -----------------------------------------------------------------------------------
    def back(self) -> Run:
        """Show the run before this one (its settings become the inputs)."""
        return self._show(self.history.back())

    def forward(self) -> Run:
        return self._show(self.history.forward())

    def _show(self, run: Run) -> Run:
        self.inputs = run.settings
        self.inspected, self.selection = None, []
        return run

    def compare(self, other: int):
        """The shown run and run `other` (an index into `history.runs`) side by side on one scale."""
        self._run()
        picked = sorted({self.history.index, other})
        runs = [self.history.run(i) for i in picked]
        if len(runs) < 2:
            raise NNPatchError("pick another run to compare with: this one is on screen already")
        titles = [f"run {i + 1}: {_describe(r.settings)}" for i, r in zip(picked, runs)]
        return _compare([r.result for r in runs], titles, self.theme)

    def pair_figure(self):
        """One small heatmap per pair of the shown run over all pairs."""
        run = self._run()
        if not run.per_pair:
            raise NNPatchError("per-pair views need a run over all pairs: pick \"all pairs (mean)\" and Run")
        titles = [f"pair {i + 1}" for i in range(len(run.per_pair))]
        return as_grid(_compare(run.per_pair, titles, self.theme), len(run.per_pair))

    # -- cells -------------------------------------------------------------------------------------
    def inspect(self, cell: Cell) -> Outcome:
        """Patch one cell alone, as the heatmap did, and report what it does."""
        cell = self._checked(cell)
        outcome = self._patch([cell])
        self.inspected = cell
        return outcome

    def toggle(self, cell: Cell) -> list[Cell]:
        cell = self._checked(cell)
        if cell in self.selection:
            self.selection.remove(cell)
        else:
            self.selection.append(cell)
        return list(self.selection)

    def clear_selection(self) -> None:
        self.selection = []

    def patch_selected(self) -> Outcome:
        """Patch every selected cell together in one run."""
        self._fresh()
        if not self.selection:
            raise NNPatchError("no cells are selected: click cells of the heatmap to select them "
                               "(click mode 'select', or shift-click), then patch them together")
        return self._patch(sorted(self.selection))

    def label(self, cell: Cell) -> str:
        """How a cell reads to the user: 'layer 2, pos 5 ' John'', 'layer 2, head 3'."""
        s = self._result_settings()
        dims = s.by
        parts = [f"{d} {i}" for d, i in zip(dims, cell)]
        if "pos" in dims:
            pos = cell[dims.index("pos")]
            token = self.result.labels["pos"][pos] if s.all_pairs else self.model.to_str_tokens(s.clean)[pos]
            parts[-1] += f" {token!r}"
        return ", ".join(parts)

    # -- code --------------------------------------------------------------------------------------
    def code(self) -> str:
        """Plain Python on nnpatch's public API that recomputes every number on screen."""
        s = self._result_settings()
        pairs = self._pairs_of(s)
        if s.all_pairs:
            prompts = [f"clean = {[p['clean'] for p in pairs]!r}", f"corrupt = {[p['corrupt'] for p in pairs]!r}",
                       f"answer, wrong = {[p['answer'] for p in pairs]!r}, {[p['wrong'] for p in pairs]!r}"]
        else:
            prompts = [f"clean = {s.clean!r}", f"corrupt = {s.corrupt!r}", f"answer, wrong = {s.answer!r}, {s.wrong!r}"]
        lines = ["import nnpatch", "", _model_line(self.model), *prompts,
                 f"options = dict(answer=answer, wrong=wrong, metric={s.metric!r}, site={s.site!r},",
                 f"               by={s.by!r}, direction={s.direction!r})", "",
                 "# The heatmap: every cell patched alone" + (f", mean over {len(pairs)} pairs" if s.all_pairs else ""),
                 "result = nnpatch.activation_patching(model, clean, corrupt, **options)",
                 "print('clean', result.clean_score, 'corrupt', result.corrupt_score)",
                 "fig = result.plot()  # the heatmap: display fig"]
        if s.all_pairs:
            lines += ["# The spread on hover: each pair swept alone",
                      "per_pair = [nnpatch.activation_patching(model, c, k, **{**options, 'answer': a, 'wrong': w})",
                      "            for c, k, a, w in zip(clean, corrupt, answer, wrong)]"]
        if self.inspected is not None:
            c = self.inspected
            lines += ["", f"# The inspected cell: {self.label(c)}",
                      f"cell = nnpatch.sweep.patch_cells(model, clean, corrupt, [{c!r}], **options)",
                      f"print(float(result.values{list(c)!r}), cell.score, cell.patched_score)"]
        if self.selection:
            cells = sorted(self.selection)
            lines += ["", "# The selected cells, patched together",
                      f"patched = nnpatch.sweep.patch_cells(model, clean, corrupt, {cells!r}, **options)",
                      "print(patched.score, patched.patched_score)"]
        return "\n".join(lines) + "\n"

    # -- the steps behind the public methods -------------------------------------------------------
    def _pairs_of(self, s: Settings) -> list[dict]:
        """The prompt pairs a run of `s` covers, each with its answer and wrong token."""
        if not s.all_pairs:
            return [{"clean": s.clean, "corrupt": s.corrupt, "answer": s.answer, "wrong": s.wrong}]
        if not self.pairs:
            raise NNPatchError("\"all pairs\" needs prompt pairs: give them as Workbench(model, pairs=...)")
        return [{**p, "answer": p["answer"] or s.answer, "wrong": p["wrong"] or s.wrong} for p in self.pairs]

    def _check(self, s: Settings) -> None:
        if s.by not in GRANULARITIES.values():
            raise NNPatchValueError(f"granularity must be one of {list(GRANULARITIES.values())}, got {s.by}")
        if s.direction not in DIRECTIONS:
            raise NNPatchValueError(f"direction must be one of {list(DIRECTIONS)}, got {s.direction!r}")
        names = self.site_names(s.by)
        if s.site not in names:
            close = difflib.get_close_matches(s.site, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise NNPatchValueError(f"site {s.site!r} cannot be swept by {' × '.join(s.by)}{hint}; "
                                    f"this model's sites for it are {names}")
        for i, p in enumerate(self._pairs_of(s)):
            where = f" (pair {i + 1})" if s.all_pairs else ""
            problem = self.inputs_help.problem(p["clean"], p["corrupt"])
            if problem:
                raise NNPatchValueError(problem + where)
            same = self._token_id("answer", p["answer"], where) == self._token_id("wrong token", p["wrong"], where)
            if same and s.metric.startswith("logit_diff"):
                raise NNPatchValueError(f"the answer and the wrong token are both {p['answer']!r}{where}: the "
                                        "metric compares the two, so pick a different wrong token")

    def _token_id(self, role: str, text: str, where: str = "") -> int:
        if not text:
            raise NNPatchValueError(f"the {role} is empty{where}: pick one of the suggested tokens or type one")
        return token_id(self.model.tokenizer, text, what=f"the {role}{where}")

    def _checked(self, cell: Cell) -> Cell:
        """`cell` as a tuple of ints inside the shown result; refused while the inputs are stale."""
        self._fresh()
        shape = tuple(self._result().values.shape)
        cell = tuple(int(i) for i in cell)
        if len(cell) != len(shape) or not all(0 <= i < n for i, n in zip(cell, shape)):
            dims = " x ".join(self.settings.by)
            raise NNPatchIndexError(f"cell {cell} is outside the heatmap's {dims} cells {shape}")
        return cell

    def _fresh(self) -> None:
        self._result()
        if self.stale:
            raise NNPatchError(STALE)

    def _patch(self, cells: list[Cell]) -> Outcome:
        s = self._result_settings()
        pairs = self._pairs_of(s)
        patched = _patch_cells(self.model, s, pairs, cells)
        one = len(cells) == 1
        probs = {run: torch.softmax(getattr(patched, f"{run}_logits").float(), -1)  # [pairs, vocab]
                 for run in ("clean", "corrupt", "patched")}
        ids = {name: [self._token_id(name, p[name]) for p in pairs] for name in ("answer", "wrong")}
        rows = torch.arange(len(pairs))
        return Outcome(
            cells=tuple(cells),
            label=self.label(cells[0]) if one else f"{len(cells)} cells",
            clean_score=float(patched.clean_score), corrupt_score=float(patched.corrupt_score),
            patched_score=float(patched.patched_score), normalized=float(patched.score),
            heatmap_value=float(self.result.values[cells[0]]) if one else None,
            top={run: top(self.model.tokenizer, None, TOP_K, p.mean(0)) for run, p in probs.items()},
            probs={run: {name: float(p[rows, ids[name]].mean()) for name in ids} for run, p in probs.items()},
            pairs=len(pairs))

    def _run(self) -> Run:
        self._result()
        return self.history.current

    def _result(self):
        if self.result is None:
            raise NNPatchError("there is no heatmap yet: set up the prompts and click Run")
        return self.result

    def _result_settings(self) -> Settings:
        return self._run().settings


# -- the public API this controller calls (one place, so the generated code matches it) -----------
def _standard_sites(model) -> list[str]:
    return list(sites(model))


def _metric_names() -> list[str]:
    return list(METRICS)


def _activation_patching(model, s: Settings, pairs: list[dict], progress=None):
    # No tqdm bar: inside a widget callback it would land in JupyterLab's log console.
    clean, corrupt, answer, wrong = _columns(pairs)
    return activation_patching(model, clean, corrupt, answer=answer, wrong=wrong, metric=s.metric,
                               site=s.site, by=s.by, direction=s.direction, progress=progress or False)


def _patch_cells(model, s: Settings, pairs: list[dict], cells: list[Cell]):
    clean, corrupt, answer, wrong = _columns(pairs)
    return patch_cells(model, clean, corrupt, cells, answer=answer, wrong=wrong, metric=s.metric,
                       site=s.site, by=s.by, direction=s.direction)


def _columns(pairs: list[dict]):
    """(clean, corrupt, answer, wrong) of the pairs: strings for one pair, lists for several."""
    cols = [[p[k] for p in pairs] for k in ("clean", "corrupt", "answer", "wrong")]
    return [c[0] for c in cols] if len(pairs) == 1 else cols


def _plot(result, theme: str):
    """`heatmap.plot` in the page's dark theme, else in nnpatch's chosen one (`set_theme`)."""
    return heatmap.plot(result, theme="dark" if theme == "dark" else None)


def _compare(results, titles, theme: str):
    fig = heatmap.compare(results, titles=titles, theme="dark" if theme == "dark" else None)
    fig.update_layout(width=None, autosize=True)
    return fig


def _model_line(model) -> str:
    """How the generated code gets `model`: by bundled name or folder when we can tell."""
    path = getattr(getattr(model.module, "config", None), "_name_or_path", "") or ""
    for name in bundled.available():
        if path and os.path.realpath(path) == os.path.realpath(bundled.path(name)):
            return f"model = nnpatch.models.load({name!r})"
    if path and os.path.isdir(path):
        return f"model = nnpatch.LanguageModel({path!r})"
    return "# `model` is the nnpatch.LanguageModel you gave the Workbench"


# -- helpers ----------------------------------------------------------------------------------------
def _as_language_model(model) -> LanguageModel:
    if isinstance(model, LanguageModel):
        if model.tokenizer is None:
            raise NNPatchError("the Workbench needs the model's tokenizer: "
                               "wrap it as nnpatch.LanguageModel(module, tokenizer=tokenizer)")
        return model
    if isinstance(model, (str, os.PathLike, torch.nn.Module)):
        return _as_language_model(LanguageModel(model))
    raise NNPatchTypeError(f"Workbench(model) takes an nnpatch.LanguageModel, a Hugging Face model or a "
                           f"local folder, got {type(model).__name__}")


def _describe(s: Settings) -> str:  # a run in a few words, for a subplot title
    return f"{s.site} by {'×'.join(d[0].upper() for d in s.by)}, {'all pairs' if s.all_pairs else 'one pair'}"


def _rows(values: torch.Tensor) -> list[list[float]]:
    """A cell grid as the heatmap's rows (layer × head × pos: one row per layer and head)."""
    v = values.reshape(-1, values.shape[-1]) if values.dim() == 3 else values
    return v.tolist()


def _box(point: tuple[int, int], color: str, dash: str) -> dict:
    """A rectangle around heatmap point (row, col); category axes place cells at integers."""
    row, col = point
    return dict(type="rect", xref="x", yref="y", x0=col - 0.5, x1=col + 0.5, y0=row - 0.5, y1=row + 0.5,
                line=dict(color=color, width=3, dash=dash), fillcolor="rgba(0,0,0,0)")
