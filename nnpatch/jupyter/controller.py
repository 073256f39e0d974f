"""The logic of the patching workbench, with no widget library in sight.

`nnpatch.Workbench` is a thin view: it keeps what the user sees in traitlets and hands every
click to a method of `WorkbenchController`, which checks the input, calls nnpatch's public API
(`activation_patching` for the heatmap, `sweep.patch_cells` for one cell or a selection) and
returns plain data. Tests drive this class directly and compare its numbers with the API's.

Examples:
    >>> import nnpatch
    >>> from nnpatch.jupyter.controller import Settings, WorkbenchController
    >>> ctl = WorkbenchController(nnpatch.models.load("ioi"))
    >>> clean = "When Mary and John went to the store, John gave a drink to"
    >>> corrupt = "When Mary and John went to the store, Mary gave a drink to"
    >>> result = ctl.run(Settings(clean, corrupt, answer=" Mary", wrong=" John"))
    >>> round(ctl.inspect((0, 9)).normalized, 3) == round(float(result.values[0, 9]), 3)  # S2, layer 0
    True
    >>> print(ctl.code())                                  # doctest: +SKIP
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .. import bundled
from ..engine import LanguageModel
from ..engine.inputs import input_device, token_id
from ..errors import NNPatchError, NNPatchIndexError, NNPatchTypeError, NNPatchValueError
from ..patching import METRICS, activation_patching, patch_cells
from ..patching.pairs import pair_dicts
from ..patching.sites import sites

Cell = tuple[int, int]  # indices along the result's two dims, e.g. (layer, pos)

GRANULARITIES = {"layer × pos": ("layer", "pos"), "layer × head": ("layer", "head")}
TOP_K = 8


@dataclass(frozen=True)
class Settings:
    """One experiment as the user set it up: everything a run needs."""

    clean: str
    corrupt: str
    answer: str
    wrong: str
    site: str = "resid_pre"
    by: tuple[str, str] = ("layer", "pos")
    metric: str = "logit_diff"


@dataclass(frozen=True)
class Token:
    text: str  # the token as the tokenizer decodes it
    source: str  # the slice of the prompt it came from ("" when the tokenizer cannot say)
    unknown: bool  # the tokenizer had no token for `source` and used its unknown token


@dataclass(frozen=True)
class Preview:
    """The two prompts' tokens, and where they disagree."""

    clean: list[Token]
    corrupt: list[Token]
    differ: list[int]  # positions (within the shorter prompt) where the tokens differ
    warning: str  # why a run would fail as things stand ("" when it would not)


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


class WorkbenchController:
    """Holds one model's experiment: the last run, the inspected cell and the selected cells."""

    def __init__(self, model, pairs: Iterable | None = None):
        self.model = _as_language_model(model)
        self.pairs = pair_dicts(pairs)
        self.settings: Settings | None = None  # of the last run
        self.result = None  # the PatchingResult of the last run
        self.inspected: Cell | None = None
        self.selection: list[Cell] = []
        self._predictions: dict[str, list[tuple[str, float]]] = {}  # prompt -> top-k, while typing

    # -- before a run ------------------------------------------------------------------------------
    def site_names(self, by: tuple[str, str] = ("layer", "pos")) -> list[str]:
        """The standard sites of this model that a sweep over `by` can patch."""
        return [name for name in _standard_sites(self.model) if (name == "head_out") == ("head" in by)]

    def tokens(self, prompt: str) -> list[Token]:
        tok = self.model.tokenizer
        ids = self.model.to_tokens(prompt) if prompt else []
        texts = [tok.decode([i]) for i in ids]
        unk = getattr(tok, "unk_token_id", None)
        spans = _offsets(tok, prompt, len(ids))
        return [Token(t, s, unk is not None and i == unk and s.strip() != tok.unk_token)
                for i, t, s in zip(ids, texts, spans)]

    def preview(self, clean: str, corrupt: str) -> Preview:
        a, b = self.tokens(clean), self.tokens(corrupt)
        differ = [p for p, (x, y) in enumerate(zip(a, b)) if x.text != y.text]
        return Preview(a, b, differ, _prompt_problem(clean, corrupt, a, b) or "")

    def metric_names(self) -> list[str]:
        return _metric_names()

    def predictions(self, prompt: str) -> list[tuple[str, float]]:
        """The model's top-k next tokens after `prompt`, with probabilities."""
        if not prompt:
            return []
        if prompt not in self._predictions:
            ids = torch.tensor([self.model.to_tokens(prompt)], device=input_device(self.model.module))
            with torch.no_grad():
                logits = self.model(input_ids=ids).logits[0, -1]  # [vocab]
            if len(self._predictions) >= 16:
                self._predictions.pop(next(iter(self._predictions)))
            self._predictions[prompt] = self._top(logits, TOP_K)
        return self._predictions[prompt]

    def suggest(self, clean: str, corrupt: str) -> tuple[str, str]:
        """Answer and wrong token to start from: the clean and the corrupt run's top predictions
        (the corrupt run's best other token when both runs predict the same)."""
        answer = next(iter(self.predictions(clean)), ("", 0.0))[0]
        wrong = next((t for t, _ in self.predictions(corrupt) if t != answer), "")
        return answer, wrong

    # -- the heatmap ---------------------------------------------------------------------------
    def run(self, settings: Settings, progress: Callable[[int, int], None] | None = None):
        """Sweep every cell; the result becomes the heatmap, and earlier cells are forgotten.
        `progress(done, total)` is called as patched runs finish."""
        self._check(settings)
        self.result = _activation_patching(self.model, settings, progress)
        self.settings = settings
        self.inspected, self.selection = None, []
        return self.result

    def figure(self):
        """The heatmap of the last run (`PatchingResult.plot()`), with the selected cells boxed
        and the inspected cell outlined."""
        fig = self._result().plot()
        boxes = [_box(c, "#111", "solid") for c in self.selection]
        if self.inspected is not None:
            boxes.append(_box(self.inspected, "#e8590c", "dot"))
        fig.update_layout(shapes=boxes, clickmode="event")
        return fig

    def cell(self, row: int, col: int) -> Cell:
        """The cell behind heatmap point (row, col) of `figure()`, checked against the result."""
        shape = tuple(self._result().values.shape)
        if not (0 <= row < shape[0] and 0 <= col < shape[1]):
            raise NNPatchIndexError(f"cell ({row}, {col}) is outside the heatmap's {shape[0]} x {shape[1]} cells")
        return (int(row), int(col))

    # -- cells ----------------------------------------------------------------------------------
    def inspect(self, cell: Cell) -> Outcome:
        """Patch one cell alone, as the heatmap did, and report what it does."""
        cell = self.cell(*cell)
        outcome = self._patch([cell])
        self.inspected = cell
        return outcome

    def toggle(self, cell: Cell) -> list[Cell]:
        cell = self.cell(*cell)
        if cell in self.selection:
            self.selection.remove(cell)
        else:
            self.selection.append(cell)
        return list(self.selection)

    def clear_selection(self) -> None:
        self.selection = []

    def patch_selected(self) -> Outcome:
        """Patch every selected cell together in one run."""
        if not self.selection:
            raise NNPatchError("no cells are selected: click cells of the heatmap to select them "
                               "(click mode 'select', or shift-click), then patch them together")
        return self._patch(sorted(self.selection))

    def label(self, cell: Cell) -> str:
        """How a cell reads to the user: 'layer 2, pos 5 ' John'' or 'layer 2, head 3'."""
        dims = self._result_settings().by
        parts = [f"{d} {i}" for d, i in zip(dims, cell)]
        if "pos" in dims:
            pos = cell[dims.index("pos")]
            parts[-1] += f" {self.model.to_str_tokens(self.settings.clean)[pos]!r}"
        return ", ".join(parts)

    # -- code -----------------------------------------------------------------------------------
    def code(self) -> str:
        """Plain Python on nnpatch's public API that recomputes every number on screen."""
        s = self._result_settings()
        lines = ["import nnpatch", "", _model_line(self.model),
                 f"clean = {s.clean!r}", f"corrupt = {s.corrupt!r}",
                 f"options = dict(answer={s.answer!r}, wrong={s.wrong!r}, metric={s.metric!r},",
                 f"               site={s.site!r}, by={s.by!r})", "",
                 "# The heatmap: every cell patched alone",
                 "result = nnpatch.activation_patching(model, clean, corrupt, **options)",
                 "print('clean', result.clean_score, 'corrupt', result.corrupt_score)",
                 "fig = result.plot()  # the heatmap: display fig"]
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

    # -- the steps behind the public methods ----------------------------------------------------
    def _check(self, s: Settings) -> None:
        if s.by not in GRANULARITIES.values():
            raise NNPatchValueError(f"granularity must be one of {list(GRANULARITIES.values())}, got {s.by}")
        names = self.site_names(s.by)
        if s.site not in names:
            close = difflib.get_close_matches(s.site, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise NNPatchValueError(f"site {s.site!r} cannot be swept by {' × '.join(s.by)}{hint}; "
                                    f"this model's sites for it are {names}")
        problem = _prompt_problem(s.clean, s.corrupt, self.tokens(s.clean), self.tokens(s.corrupt))
        if problem:
            raise NNPatchValueError(problem)
        same = self._token_id("answer", s.answer) == self._token_id("wrong token", s.wrong)
        if same and s.metric.startswith("logit_diff"):
            raise NNPatchValueError(f"the answer and the wrong token are both {s.answer!r}: the metric "
                                    "compares the two, so pick a different wrong token")

    def _token_id(self, role: str, text: str) -> int:
        if not text:
            raise NNPatchValueError(f"the {role} is empty: pick one of the suggested tokens or type one")
        return token_id(self.model.tokenizer, text, what=f"the {role}")

    def _patch(self, cells: list[Cell]) -> Outcome:
        s = self._result_settings()
        patched = _patch_cells(self.model, s, cells)
        one = len(cells) == 1
        return Outcome(
            cells=tuple(cells),
            label=self.label(cells[0]) if one else f"{len(cells)} cells",
            clean_score=float(patched.clean_score), corrupt_score=float(patched.corrupt_score),
            patched_score=float(patched.patched_score), normalized=float(patched.score),
            heatmap_value=float(self.result.values[cells[0]]) if one else None,
            top={run: self._top(getattr(patched, f"{run}_logits")[0], TOP_K)  # one pair: row 0
                 for run in ("clean", "corrupt", "patched")})

    def _top(self, logits: torch.Tensor, k: int) -> list[tuple[str, float]]:
        probs = torch.softmax(logits.detach().float(), dim=-1)  # [vocab]
        p, ids = probs.topk(min(k, probs.numel()))
        return [(self.model.tokenizer.decode([i]), float(v)) for v, i in zip(p.tolist(), ids.tolist())]

    def _result(self):
        if self.result is None:
            raise NNPatchError("there is no heatmap yet: set up the prompts and click Run")
        return self.result

    def _result_settings(self) -> Settings:
        self._result()
        return self.settings


# -- the public API this controller calls (one place, so the generated code matches it) -----------
def _standard_sites(model) -> list[str]:
    return list(sites(model))


def _metric_names() -> list[str]:
    return list(METRICS)


def _activation_patching(model, s: Settings, progress=None):
    # No tqdm bar: inside a widget callback it would land in JupyterLab's log console.
    return activation_patching(model, s.clean, s.corrupt, answer=s.answer, wrong=s.wrong,
                               metric=s.metric, site=s.site, by=s.by, progress=progress or False)


def _patch_cells(model, s: Settings, cells: list[Cell]):
    return patch_cells(model, s.clean, s.corrupt, cells, answer=s.answer, wrong=s.wrong,
                       metric=s.metric, site=s.site, by=s.by)


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


def _prompt_problem(clean: str, corrupt: str, a: list[Token], b: list[Token]) -> str | None:
    for role, text in (("clean", clean), ("corrupt", corrupt)):
        if not text.strip():
            return f"the {role} prompt is empty: type a prompt"
    for role, tokens in (("clean", a), ("corrupt", b)):
        unknown = [f"{p} ({t.source!r})" for p, t in enumerate(tokens) if t.unknown]
        if unknown:
            return (f"the {role} prompt has words the model's tokenizer does not know, at position "
                    f"{', '.join(unknown)}: the model would read each as its unknown token. "
                    "Use words of the model's vocabulary")
    if len(a) != len(b):
        return (f"the prompts differ in length: clean has {len(a)} tokens, corrupt has {len(b)}; "
                f"{_where_lengths_part(a, b)}. Patching pairs positions one to one, so edit the "
                "prompts until they have the same number of tokens")
    return None


def _where_lengths_part(a: list[Token], b: list[Token]) -> str:
    """The first stretch where one prompt has more tokens than the other, in words."""
    ta, tb = [t.text for t in a], [t.text for t in b]
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes():
        if i2 - i1 != j2 - j1:
            def where(start, stop):
                return f"position {start}" if stop - start == 1 else f"positions {start}-{stop - 1}"
            if i1 == i2:
                return f"corrupt has {tb[j1:j2]} at {where(j1, j2)} where clean has none"
            if j1 == j2:
                return f"clean has {ta[i1:i2]} at {where(i1, i2)} where corrupt has none"
            return f"clean has {ta[i1:i2]} at {where(i1, i2)} where corrupt has {tb[j1:j2]}"
    return "the token lists part at the end"


def _offsets(tok, prompt: str, n: int) -> list[str]:
    """The slice of `prompt` behind each token, from a fast tokenizer's offsets."""
    if not prompt:
        return []
    try:
        spans = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        return [""] * n
    if len(spans) != n:
        return [""] * n
    return [prompt[a:b] for a, b in spans]


def _box(cell: Cell, color: str, dash: str) -> dict:
    """A rectangle around heatmap point (row, col); category axes place cells at integers."""
    row, col = cell
    return dict(type="rect", xref="x", yref="y", x0=col - 0.5, x1=col + 0.5, y0=row - 0.5, y1=row + 0.5,
                line=dict(color=color, width=3, dash=dash), fillcolor="rgba(0,0,0,0)")

