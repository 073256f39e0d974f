"""IPython magics: `%%trace`, `%%patch` and `%patch_sweep`, thin entry points to nnpatch's API.

`%load_ext nnpatch` registers them. Each magic parses its line, calls the public Python API on
objects from the notebook namespace, and displays what comes back; everything it does can be
written in plain Python (each magic's docstring shows how).

    In [1]: %load_ext nnpatch
       ...: import nnpatch
       ...: model = nnpatch.models.load("ioi")
       ...: pairs = nnpatch.tasks.ioi(8, template=0)

    In [2]: %%trace model pairs.clean[0]
       ...: resid = model.transformer.h[2].input[:, -1]
       ...: logits = model.lm_head.output[:, -1]

    In [3]: %patch_sweep model --clean pairs --site resid_pre --by layer,pos

    In [4]: %%patch model --clean pairs
       ...: model.transformer.h[2].input[:, -1] = clean.transformer.h[2].input[:, -1]

Option values are Python expressions evaluated in the notebook (`--clean pairs[:4]`,
`--answer " Mary"`); the line is split at spaces outside brackets and quotes, so
`--clean nnpatch.tasks.ioi(8, template=0)` is one value. Mistakes in the magic line are
one-line `UsageError`s; errors inside a cell show the cell's own lines.
"""
from __future__ import annotations

import contextlib
import difflib
import keyword
import math
import types
from dataclasses import dataclass

import torch
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.display import display

from ..engine import Model, compile_source
from ..engine.inputs import token_ids
from ..engine.tracebacks import install
from ..errors import NNPatchError
from ..patching import activation_patching, attribution_patching
from ..patching.metrics import METRICS, REGISTRY, effect, score
from ..patching.pairs import as_list, from_task_pairs
from .cell_errors import Cell, cell_number
from .magic_line import PATCH, SWEEP, TRACE, body, indent, one_line, parse


def load_ipython_extension(ipython) -> None:
    """Register the magics (`%load_ext nnpatch` calls this)."""
    install()
    ipython.register_magics(PatchingMagics)


@magics_class
class PatchingMagics(Magics):
    """The nnpatch magics. Each one parses, calls the public API, and displays."""

    @cell_magic
    @no_var_expand
    def trace(self, line: str, cell: str):
        """%%trace MODEL [--generate N] [INPUT ...]: the cell is the body of a trace on MODEL.

        With INPUT expressions the body is one invoke on them; without, it holds
        `with tracer.invoke(...)` blocks (`tracer` is bound). The cell runs as

            with MODEL.trace(INPUT, ...) as tracer:
                <cell>

        in the notebook namespace, so every variable it assigns lands there. With `--generate N`
        the cell is the body of `with MODEL.generate(INPUT, ..., max_new_tokens=N) as tracer:`
        (a generation; loop `for step in tracer.all():` to act at every step):

            %%trace model "When Mary and John went to the store, John gave a drink to"
            hidden = model.transformer.h[1].output[:, -1]

            %%trace model --generate 5 "When Mary and John went to the store, John gave a drink to"
            for step in tracer.all():
                model.transformer.h[1].output[:, -1] += steering
            ids = model.generator.output

            %%trace model
            with tracer.invoke(clean_prompt) as clean:
                pass
            with tracer.invoke(corrupt_prompt):
                model.transformer.h[1].output[:, -1] = model.of(clean).transformer.h[1].output[:, -1]
                logits = model.lm_head.output[:, -1]
        """
        __tracebackhide__ = True
        args = parse(TRACE, line)
        self._model(args.model)
        code = body(cell, "%%trace")
        if args.generate is None:
            opened = f"{args.model}.trace({', '.join(args.inputs)})"
        else:
            opened = f"{args.model}.generate({''.join(a + ', ' for a in args.inputs)}max_new_tokens={args.generate})"
        source = f"with {opened} as tracer:\n" + indent(code, 1)
        # The `with` line stands where the magic line was, so the cell's lines keep their numbers.
        filename = self.shell.compile.cache(source, cell_number(self.shell), raw_code=source)
        self._run(source, Cell(self.shell, f"%%trace {line}\n{cell}", filename, lambda n: n, args.model))

    @cell_magic
    @no_var_expand
    def patch(self, line: str, cell: str):
        """%%patch MODEL --clean EXPR [--corrupt EXPR] [--answer TOK] [--wrong TOK] [--metric NAME] [--out NAME]

        One trace with three invokes: the clean prompt, the corrupt prompt, and the corrupt prompt
        again with the cell as its body. In the cell, `clean` and `corrupt` are the module trees
        of the other two runs (`model.of(invoke)`), so a patch reads

            %%patch model --clean pairs
            model.transformer.h[2].input[:, -1] = clean.transformer.h[2].input[:, -1]

        The result (a `PatchEffect`: the metric of each run, the normalised effect
        (patched - corrupt) / (clean - corrupt), and each run's last-position logits) is displayed
        and returned (so it lands in `_`), and stored in `--out NAME` too.

        `--clean` gives prompts (a string, a list, token ids) or task pairs (with clean, corrupt,
        answer and wrong lists, e.g. `nnpatch.tasks.ioi(8)`), from which `--corrupt`, `--answer`
        and `--wrong` default. Otherwise the answer is the clean run's top-1 token and the wrong
        token the corrupt run's. `--metric` is one of `nnpatch.sweep.METRICS` (default
        "logit_diff": answer minus wrong logit) or the name of a function of the last-position
        logits `[n, vocab]`. The notebook's own `clean`, `corrupt` and `tracer` are left as they
        were. In plain Python:

            with model.trace() as tracer:
                with tracer.invoke(pairs.clean) as c:
                    clean_logits = model.output.logits[:, -1]
                with tracer.invoke(pairs.corrupt) as k:
                    corrupt_logits = model.output.logits[:, -1]
                with tracer.invoke(pairs.corrupt):
                    clean, corrupt = model.of(c), model.of(k)
                    model.transformer.h[2].input[:, -1] = clean.transformer.h[2].input[:, -1]
                    patched_logits = model.output.logits[:, -1]
        """
        __tracebackhide__ = True
        args = parse(PATCH, line)
        model = self._model(args.model)
        pairs = self._pairs(args)
        metric = self._metric(args.metric)
        n = len(as_list(pairs.clean))
        answer, wrong = _token_ids(model, pairs.answer, n, "--answer"), _token_ids(model, pairs.wrong, n, "--wrong")
        runs = types.SimpleNamespace(clean=pairs.clean, corrupt=pairs.corrupt)
        source = _patch_source(args.model, body(cell, "%%patch"))
        filename = f"<%%patch In[{cell_number(self.shell)}]>"
        lines = len(cell.splitlines())
        shown = Cell(self.shell, f"%%patch {line}\n{cell}", filename, model=args.model,
                     to_cell_line=lambda n: n - _PATCH_LINES + 1 if 0 < n - _PATCH_LINES < lines + 1 else 1)
        with _borrowing(self.shell.user_ns, {_RUNS: runs}, restore=("clean", "corrupt", "tracer", *_INVOKES)):
            self._run(source, shown)
        logits = [_last_logits(out, args.model) for out in (runs.clean_out, runs.corrupt_out, runs.patched_out)]
        result = PatchEffect.measure(model, metric, *logits, answer=answer, wrong=wrong)
        if args.out:
            self.shell.user_ns[args.out] = result
        return result

    @line_magic
    @no_var_expand
    def patch_sweep(self, line: str):
        """%patch_sweep MODEL --clean EXPR [--corrupt EXPR] [--site SITE] [--by layer,pos] [--metric NAME]
        [--answer TOK] [--wrong TOK] [--direction denoise|noise] [--layers EXPR] [--attribution] [--out NAME]

        Runs `nnpatch.activation_patching` (or `nnpatch.attribution_patching` with --attribution),
        displays the heatmap (`result.plot()`) and returns the `PatchingResult` (so it lands in
        `_`; `--out NAME` stores it there too). Without answers or task pairs, the answer is the
        clean run's top-1 token and the wrong token the corrupt run's, as in %%patch.

            %patch_sweep model --clean pairs --site attn_out --by layer,pos --out attn

        is, in plain Python,

            attn = nnpatch.activation_patching(model, pairs, site="attn_out", by=("layer", "pos"))
            attn.plot()
        """
        args = parse(SWEEP, line)
        model = self._model(args.model)
        pairs = self._pairs(args)
        metric = self._metric(args.metric)
        layers = self._value(args.layers, "--layers") if args.layers else None
        sweep = attribution_patching if args.attribution else activation_patching
        try:
            answer, wrong = pairs.answer, pairs.wrong
            if (answer is None or wrong is None) and metric in _NEEDS_ANSWERS:
                top_clean, top_corrupt = _predictions(model, pairs.clean, pairs.corrupt)
                answer = top_clean if answer is None else answer
                wrong = top_corrupt if wrong is None else wrong
            result = sweep(model, pairs.clean, pairs.corrupt, answer=answer, wrong=wrong, metric=metric,
                           site=args.site, by=args.by, direction=args.direction, layers=layers)
        except NNPatchError as e:
            raise UsageError(f"%patch_sweep: {one_line(e)}") from None
        display(result.plot())
        if args.out:
            self.shell.user_ns[args.out] = result
        return result

    # -- reading the notebook namespace -------------------------------------------------------
    def _model(self, name: str) -> Model:
        """The nnpatch model the notebook calls `name`."""
        ns = self.shell.user_ns
        if not all(part.isidentifier() and not keyword.iskeyword(part) for part in name.split(".")):
            raise UsageError(f"MODEL must be the name of an nnpatch model in the notebook, got {name!r}")
        try:
            value = eval(name, ns)
        except Exception:  # noqa: BLE001 - any failure means there is no such model
            models = sorted(k for k, v in ns.items() if isinstance(v, Model) and not k.startswith("_"))
            close = difflib.get_close_matches(name, models, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (
                f"; the models here are {', '.join(models)}" if models else
                "; load one first, e.g. model = nnpatch.models.load('ioi')")
            raise UsageError(f"no model named {name!r} in the notebook{hint}") from None
        if not isinstance(value, Model):
            fix = (f"wrap it first: {name} = nnpatch.LanguageModel({name}, tokenizer=...)"
                   if isinstance(value, torch.nn.Module) else "give the name of an nnpatch model")
            raise UsageError(f"{name!r} is a {type(value).__name__}, not an nnpatch model; {fix}")
        return value

    def _value(self, expr: str, option: str):
        """An option's Python expression, evaluated in the notebook namespace."""
        try:
            return eval(expr, self.shell.user_ns)
        except Exception as e:  # noqa: BLE001 - the user's expression; say what went wrong
            raise UsageError(f"{option} {expr}: {type(e).__name__}: {one_line(e)} (option values are "
                             "Python expressions: quote text, e.g. --answer \" Mary\")") from None

    def _pairs(self, args) -> types.SimpleNamespace:
        """Clean and corrupt inputs and the answer/wrong tokens, with defaults from task pairs."""
        clean = self._value(args.clean, "--clean")
        corrupt = self._value(args.corrupt, "--corrupt") if args.corrupt else None
        answer = self._value(args.answer, "--answer") if args.answer else None
        wrong = self._value(args.wrong, "--wrong") if args.wrong else None
        clean, corrupt, answer, wrong = from_task_pairs(clean, corrupt, answer, wrong)
        if corrupt is None:
            raise UsageError("--corrupt is missing: give corrupt prompts, or task pairs to --clean "
                             "(e.g. --clean nnpatch.tasks.ioi(8, template=0))")
        return types.SimpleNamespace(clean=clean, corrupt=corrupt, answer=answer, wrong=wrong)

    def _metric(self, name: str):
        """A metric name of the sweeps, or a function of the logits named in the notebook."""
        names = METRICS
        if name in names:
            return name
        value = self.shell.user_ns.get(name)
        if name.isidentifier() and callable(value):
            return value
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown metric {name!r}; {hint}choose one of {', '.join(names)}, or the "
                         "name of a function of the last-position logits [n, vocab]")

    # -- running a cell's code ----------------------------------------------------------------
    def _run(self, source: str, cell: Cell) -> None:
        """Compile generated source under a filename tied to the cell and run it in the notebook,
        so that its variables land there; an error shows the cell's lines (`cell_errors`)."""
        __tracebackhide__ = True
        try:
            code = compile_source(source, cell.filename)
        except SyntaxError as e:  # the cell was checked, so the magic line's expressions are wrong
            text = (e.text or "").strip()
            raise UsageError(f"the magic line does not make valid Python: {e.msg}: {text}") from None
        try:
            exec(code, self.shell.user_ns)
        except BaseException as e:  # noqa: BLE001 - re-raised from the cell's own lines
            cell.reraise(e)


# -- what %%patch measures ------------------------------------------------------------------------

@dataclass(repr=False)
class PatchEffect:
    """What a `%%patch` cell measured.

    `clean_score`, `corrupt_score` and `patched_score` are the metric of each run (averaged over
    prompts); `effect` is (patched - corrupt) / (clean - corrupt): 0 when the patch changes
    nothing, 1 when it restores the clean behaviour. `answer` and `wrong` are the tokens the
    metric compares, per prompt; the logits are each run's at the last position `[n, vocab]`.

        %%patch model --clean pairs --out r
        model.transformer.h[2].input[:, -1] = clean.transformer.h[2].input[:, -1]

        r.effect, r.patched_logits.shape            # (1.001, torch.Size([8, 168]))
    """

    metric: str
    clean_score: float
    corrupt_score: float
    patched_score: float
    effect: float
    answer: list[str]
    wrong: list[str]
    clean_logits: torch.Tensor  # [n, vocab]
    corrupt_logits: torch.Tensor  # [n, vocab]
    patched_logits: torch.Tensor  # [n, vocab]

    @classmethod
    def measure(cls, model, metric, clean: torch.Tensor, corrupt: torch.Tensor, patched: torch.Tensor, *,
                answer: list[int] | None, wrong: list[int] | None) -> "PatchEffect":
        """Score three runs' last-position logits `[n, vocab]`; missing answer / wrong tokens are
        the clean / corrupt run's top-1 predictions."""
        answer = answer if answer is not None else clean.argmax(-1).tolist()
        wrong = wrong if wrong is not None else corrupt.argmax(-1).tolist()
        clean_score, corrupt_score, patched_score = (score(logits, metric, answer, wrong, clean)
                                                     for logits in (clean, corrupt, patched))
        decode = getattr(getattr(model, "tokenizer", None), "decode", None)
        names = (lambda ids: [decode([i]) for i in ids]) if decode else (lambda ids: [str(i) for i in ids])
        return cls(getattr(metric, "__name__", metric), clean_score, corrupt_score, patched_score,
                   effect(patched_score, clean_score, corrupt_score), names(answer), names(wrong),
                   clean, corrupt, patched)

    def __repr__(self) -> str:
        n = self.clean_logits.shape[0]
        undefined = " (clean and corrupt score the same)" if math.isnan(self.effect) else ""
        tokens = ""
        if self.metric in _NEEDS_ANSWERS:
            first = f"answer {self.answer[0]!r}, wrong {self.wrong[0]!r}"
            tokens = f"; {first}" + (f", ... ({n} prompts)" if n > 1 else "")
        return (f"PatchEffect({self.metric}: clean {self.clean_score:.4g}, corrupt {self.corrupt_score:.4g}, "
                f"patched {self.patched_score:.4g}; effect {self.effect:.3f}{undefined}{tokens})")


def _token_ids(model, value, n: int, option: str) -> list[int] | None:
    """Token ids of an --answer / --wrong value (one token, string or id, or one per prompt)."""
    if value is None:
        return None
    try:
        return token_ids(getattr(model, "tokenizer", None), value, n, what=option)
    except NNPatchError as e:
        raise UsageError(one_line(e)) from None


def _last_logits(output, model_name: str) -> torch.Tensor:
    """Last-position logits `[n, vocab]` of a model output (a ModelOutput, tuple or tensor)."""
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise UsageError(f"{model_name} returned {type(output).__name__}, not logits [batch, pos, vocab]; "
                         "%%patch and %patch_sweep need a language model")
    return (logits[:, -1] if logits.dim() == 3 else logits).detach()


_NEEDS_ANSWERS = tuple(name for name, m in REGISTRY.items() if m.needs)


def _predictions(model, clean, corrupt) -> tuple[list[int], list[int]]:
    """The clean and corrupt runs' top-1 next tokens, per prompt."""
    with model.trace() as tracer:
        with tracer.invoke(clean):
            clean_out = model.output
        with tracer.invoke(corrupt):
            corrupt_out = model.output
    return (_last_logits(clean_out, "the model").argmax(-1).tolist(),
            _last_logits(corrupt_out, "the model").argmax(-1).tolist())


# -- the code a %%patch cell runs -----------------------------------------------------------------

_RUNS = "__nnpatch_runs__"  # carries the inputs in and each run's output out
_INVOKES = ("__nnpatch_clean__", "__nnpatch_corrupt__")


_PATCH_LINES = 5  # lines of generated code before the cell's first line in _patch_source


def _patch_source(model: str, cell: str) -> str:
    """The trace a %%patch cell runs in. The patched invoke comes last: an invoke can only read
    (via `model.of`) another invoke that started before it."""
    clean, corrupt = _INVOKES
    return (f"with {model}.trace() as tracer:\n"
            f"    with tracer.invoke({_RUNS}.clean) as {clean}: {_RUNS}.clean_out = {model}.output\n"
            f"    with tracer.invoke({_RUNS}.corrupt) as {corrupt}: {_RUNS}.corrupt_out = {model}.output\n"
            f"    clean, corrupt = {model}.of({clean}), {model}.of({corrupt})\n"
            f"    with tracer.invoke({_RUNS}.corrupt):\n"
            + indent(cell, 2) +
            f"        {_RUNS}.patched_out = {model}.output\n")


@contextlib.contextmanager
def _borrowing(ns: dict, bind: dict, restore: tuple[str, ...]):
    """Bind names in the notebook namespace for one run; afterwards put back what was there."""
    names = (*bind, *restore)
    saved = {k: ns[k] for k in names if k in ns}
    ns.update(bind)
    try:
        yield
    finally:
        for k in names:
            if k in saved:
                ns[k] = saved[k]
            else:
                ns.pop(k, None)
