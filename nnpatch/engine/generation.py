"""Generation with interventions: `with model.generate(prompts, max_new_tokens=N) as tracer:`.

Reading top-down: `GenerationTracer` is the with-block (a `tracing.Tracer` whose flush runs one
generation instead of one forward pass); `Steps` is `tracer.iter[...]` / `tracer.all()`, the loop
an invoke writes to act at several steps; `StepClock` is one invoke's step, which its reads bind
to; `GenerationPass` runs Hugging Face's `generate` on the invokes' batch and hands each step's
module values to the invokes waiting for that step.

A step is one call of the model by `generate`: step 0 reads the prompt (the prefill), step k > 0
the k-th generated token (one position, with the key/value cache on). Without a step loop every
read binds to step 0, the module's first call. Inside `for step in tracer.iter[a:b]:` the loop
body's reads bind to that step; `module.next()` moves one module's reads one call further.

Invokes are batched with left padding as in a trace; at step 0 each invoke sees its own
positions, at later steps its rows of the one new position. A variable one invoke assigns in
its step loop reaches another invoke's loop at the same step: the reader waits until the
producer has finished that step (no barriers). The loop of an invoke ends when generation does:
an end-of-sequence token that stops generation early simply ends `tracer.all()` (and a bounded
`tracer.iter[...]`) after the last step made, and the code after the loop runs.
"""
from __future__ import annotations

import threading
import torch

from ..errors import NNPatchError, NNPatchIndexError, NNPatchTypeError, NNPatchValueError
from . import module_source
from .batching import Rows, map_tensors
from .edit import default_invokes
from .envoy import Envoy
from .forward import ForwardPass, _fresh
from .hooks import attach, remove_all
from .invoke import Invoke, current_invoke, deadlock_error, event_name
from .tracing import Tracer
from .unshared import unshared

GENERATOR = "generator"  # the path of `model.generator`, whose output is the generated ids
_PROMPT_KEYWORDS = ("input_ids", "attention_mask")


class GenerationTracer(Tracer):
    """The object bound by `with model.generate(...) as tracer:`.

    Example:
        >>> import nnpatch
        >>> model = nnpatch.models.load("ioi")
        >>> steer = 0.5 * model.transformer.wte.weight[model.to_tokens(" Mary")[0]]
        >>> with model.generate("When Mary and John went to the store, John gave a drink to",
        ...                     max_new_tokens=3, do_sample=False) as tracer:
        ...     hidden = []
        ...     for step in tracer.all():
        ...         model.transformer.h[1].output[:, -1] += steer    # every step
        ...         hidden.append(model.transformer.h[1].output[:, -1].save())
        ...     ids = model.generator.output.save()
        >>> len(hidden), tuple(ids.shape)
        (3, (1, 17))
    """

    def __init__(self, model, inputs: tuple, kwargs: dict):
        prompt = {k: v for k, v in kwargs.items() if k in _PROMPT_KEYWORDS}
        generate_kwargs = {k: v for k, v in kwargs.items() if k not in _PROMPT_KEYWORDS}
        _check_generate_kwargs(generate_kwargs)
        super().__init__(model, inputs, prompt)
        self.generate_kwargs = generate_kwargs
        self._generator = model.generator._module
        self.output: torch.Tensor | None = None  # the generated ids [batch, prompt + new], once done

    @property
    def iter(self) -> "Steps":
        """`tracer.iter[2]`, `tracer.iter[1:4]`, `tracer.iter[[0, 3]]`, `tracer.iter[:]`: loop
        over these generation steps inside an invoke (`for step in tracer.iter[1:4]:`)."""
        return Steps(self)

    def all(self) -> "Steps":
        """Every step the generation makes: `for step in tracer.all():` (or `with tracer.all():`)."""
        return Steps(self)[:]

    @property
    def result(self):
        """The generated ids (prompt and new tokens): inside an invoke, its own rows (as
        `model.generator.output`); after the block, the whole batch."""
        inv = current_invoke()
        if inv is None:
            if self.output is None:
                raise NNPatchError("tracer.result exists once the generation has run: read it "
                                   "inside an invoke, or after the with-block")
            return self.output
        return inv.value(inv.at(GENERATOR, "output"))

    def _run_passes(self, group: list[Invoke], todo: list[Invoke]) -> None:
        try:
            if self._program.uses_grad:
                raise NNPatchError(
                    "this generation's body takes gradients (.grad / .backward()), but Hugging "
                    "Face's generate runs without autograd; take gradients in a model.trace(...) "
                    "of the generated ids instead")
            generation = GenerationPass(self, group, default_invokes(self) + todo)  # model.edit()
            generation.run()
            self.output = generation.output
            stuck = [inv for inv in todo if not inv.done]
            if stuck:  # a generation cannot be run again for an invoke that fell behind
                raise NNPatchError(
                    f"{deadlock_error(stuck)}. In a generation every invoke runs with the one "
                    "pass through the steps: a value another invoke assigns must be assigned "
                    "before (or at) the module where it is read, at the same step")
        except BaseException:
            for inv in group:
                inv.close()
            raise


def _check_generate_kwargs(kwargs: dict) -> None:
    for key in ("num_beams", "num_return_sequences"):
        if kwargs.get(key, 1) != 1:
            raise NNPatchValueError(
                f"model.generate(..., {key}={kwargs[key]!r}): nnpatch generates one sequence per "
                f"prompt (each invoke owns its rows of the batch); drop {key}=, or repeat the "
                "prompt in the invoke to sample several completions")


# -- step loops -----------------------------------------------------------------------------------

class Steps:
    """`tracer.iter[...]`: a selection of generation steps to loop over inside an invoke."""

    def __init__(self, tracer: GenerationTracer, start: int = 0, stop: int | None = None,
                 steps: list[int] | None = None, every: slice | None = None, written: str = "tracer.iter"):
        self.tracer, self.start, self.stop, self.steps = tracer, start, stop, steps
        self.every, self.written = every, written  # `every`: a slice with a step, e.g. [::2]

    def __getitem__(self, key) -> "Steps":
        if isinstance(key, slice):
            written = f"tracer.iter[{_slice_text(key)}]"
            if key.step not in (None, 1):
                return Steps(self.tracer, every=key, written=written)
            return Steps(self.tracer, key.start or 0, key.stop, written=written)
        if isinstance(key, (list, tuple)):
            return Steps(self.tracer, steps=[int(k) for k in key], written=f"tracer.iter[{list(key)}]")
        if isinstance(key, int) and not isinstance(key, bool):
            return Steps(self.tracer, key, key + 1, written=f"tracer.iter[{key}]")
        raise NNPatchTypeError(f"tracer.iter takes a step, a slice of steps or a list of steps, "
                               f"got {type(key).__name__}")

    def _indices(self, limit: int) -> list[int] | None:
        """The selected steps, checked against the generation's `limit` (max_new_tokens);
        None for an open end (every step from `start` until generation stops)."""
        if self.every is not None:
            return list(range(limit))[self.every]
        if self.steps is not None:
            chosen = self.steps
        elif self.stop is None:
            chosen = [self.start]
        else:
            chosen = list(range(self.start, self.stop))
        bad = [s for s in chosen if not 0 <= s < limit]
        if bad:
            raise NNPatchIndexError(
                f"{self.written} asks for step {bad[0]}, but this generation makes at most {limit} "
                f"steps (max_new_tokens={limit}: steps 0 to {limit - 1}); pick steps from 0 to "
                f"{limit - 1} or raise max_new_tokens")
        if chosen != sorted(set(chosen)):
            raise NNPatchValueError(f"{self.written}: steps must be increasing and distinct, since "
                                    f"generation makes them in order; got {chosen}")
        return None if self.stop is None and self.steps is None else chosen

    def __iter__(self):
        inv = current_invoke()
        generation = getattr(inv, "pass_", None)
        if inv is None or not isinstance(generation, GenerationPass):
            raise NNPatchError(
                f"loop over {self.written} inside an invoke of the generation (`with "
                "tracer.invoke(prompt):` or the body of `model.generate(prompt, ...)`), where the "
                "module reads it steps through belong to one prompt")
        clock = inv.steps
        chosen = self._indices(generation.limit)
        previous = (clock.pinned, dict(clock.offsets))
        try:
            i, step = 0, self.start
            while chosen is None or i < len(chosen):
                if chosen is not None:
                    step = chosen[i]
                # Moving on first: an invoke waiting for this one's variables of the step it
                # just finished takes them now, while the model is still at that step.
                clock.pin(step)
                generation.advanced(inv)
                if not generation.reach_step(inv, step, self.written):
                    return  # generation stopped before this step: the loop is over
                yield step
                i, step = i + 1, step + 1
        finally:
            clock.pinned, clock.offsets = previous


def _slice_text(key: slice) -> str:
    parts = ["" if v is None else str(v) for v in (key.start, key.stop)]
    return ":".join(parts) + ("" if key.step is None else f":{key.step}")


class StepClock:
    """Which generation step an invoke's reads bind to: the step its loop is at (0 outside a
    loop), plus what `module.next()` added for one module."""

    def __init__(self, limit: int):
        self.limit = limit
        self.pinned = 0
        self.offsets: dict[str, int] = {}

    def at(self, path: str, kind: str) -> tuple:
        if path == GENERATOR:
            return (path, kind, 0)  # the generated ids exist once, at the end
        return (path, kind, self.pinned + self.offsets.get(path, 0))

    def pin(self, step: int) -> None:
        self.pinned, self.offsets = step, {}

    def advance(self, name: str, path: str, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise NNPatchValueError(f"{name}.next(n) moves n >= 1 calls on, got {n!r}")
        step = self.pinned + self.offsets.get(path, 0) + n
        if step >= self.limit:
            raise NNPatchIndexError(
                f"{name}.next() would move to step {step}, but this generation makes at most "
                f"{self.limit} steps (max_new_tokens={self.limit}: steps 0 to {self.limit - 1}); "
                f"call next() fewer times or raise max_new_tokens")
        self.offsets[path] = step - self.pinned


# -- the generation itself -------------------------------------------------------------------------

class GenerationPass(ForwardPass):
    """One run of `generate` on the invokes' batch: hooks dispatch each module value at the step
    the model is at, to the invokes whose reads bind to that step."""

    def __init__(self, tracer: GenerationTracer, group: list[Invoke], invokes: list[Invoke]):
        super().__init__(tracer, group, invokes)
        kwargs = self.batch.kwargs
        self.ids = kwargs["input_ids"]  # [batch, pos], left-padded
        self.mask = kwargs.get("attention_mask")
        if self.mask is None:
            self.mask = torch.ones_like(self.ids)
        self.limit = _max_new_tokens(tracer.model._module, tracer.generate_kwargs, self.ids.shape[1])
        self.step = -1  # the model calls generate has made so far, minus one
        self.ended = False
        self.step_waiting: list[tuple[Invoke, int]] = []
        self.output = None
        for inv in invokes:
            inv.steps = StepClock(self.limit)

    # -- running generate -------------------------------------------------------------------------
    def _run_model(self) -> None:
        model = self.model
        hf = model._module
        kwargs = dict(self.tracer.generate_kwargs)
        if kwargs.get("pad_token_id") is None and getattr(getattr(hf, "generation_config", None),
                                                         "pad_token_id", None) is None:
            kwargs["pad_token_id"] = model._pad_id()
        device = model.device
        counter = hf.register_forward_pre_hook(self._step_begins, prepend=True, with_kwargs=True)
        try:
            ids = hf.generate(input_ids=self.ids.to(device), attention_mask=self.mask.to(device), **kwargs)
        finally:
            remove_all([counter])
        self.ended = True
        waiting, self.step_waiting = self.step_waiting, []
        self._drain([inv for inv, _ in waiting])  # their loops end: no step comes any more
        self.made = self.step + 1
        self.output = self.tracer._generator(ids)  # [batch, prompt + new]; hooks hand it out

    def _step_begins(self, module, args, kwargs):
        if self.aside_depth or threading.get_ident() != self.thread:
            return None
        self.step += 1
        now = [inv for inv, s in self.step_waiting if s == self.step]
        if not now:
            return None
        self.step_waiting = [(inv, s) for inv, s in self.step_waiting if s != self.step]
        root_input = ("", "input")
        hooked = root_input in self.handles
        self._drain(now)
        if not hooked and root_input in self.handles:
            # The loops just resumed read the model's own input, whose hook came too late for
            # this call (PyTorch took the list of pre-hooks when the call began): serve it here.
            return self._step_hook(root_input)(module, args, kwargs)
        return None

    def reach_step(self, inv: Invoke, step: int, written: str) -> bool:
        """Pause `inv` until generation begins `step` (True), or ends before it (False)."""
        if step < self.step:
            raise NNPatchError(
                f"{written} asks for step {step}, but the generation is already at step "
                f"{self.step}: this invoke read a later step before the loop, so the loop came "
                "too late; put the loop before reads of later steps")
        if step == self.step:
            return True
        if self.ended:
            return False
        self.step_waiting.append((inv, step))
        inv.pause(("step", step))
        return not (self.ended and step > self.step)

    def advanced(self, inv: Invoke) -> None:
        """`inv` moved to a later step: invokes waiting for its variables take them now."""
        for key in [k for k in self.name_waiting if k[0] == inv.index]:
            self.ready.extend(self.name_waiting.pop(key))

    # -- hooks: one per module, dispatching the step the model is at --------------------------------
    def event_now(self, path: str, kind: str):
        """Values recorded by caches and `.source` operations belong to the step being made."""
        return (path, kind, self.step)

    def _hook(self, event) -> None:
        if module_source.is_source_event(event):  # `.source`: installed as in a trace
            return super()._hook(event)
        key = (event[0], event[1])
        if key in self.handles:
            return
        path, kind = key
        module = self.tracer._generator if path == GENERATOR else self.model._resolve(path)
        self.handles[key] = attach(module, kind, self._step_hook(key))
        if path != GENERATOR:
            self._sentinels(path)

    def _step_hook(self, key):
        path, kind = key
        step_of = (lambda: 0) if path == GENERATOR else (lambda: self.step)

        def hook(module, args, kwargs, output=None):
            event = (path, kind, step_of())
            if self._ignores(event):
                return None
            if kind == "input":
                return self._input_hook(event)(module, args, kwargs)
            if isinstance(output, torch.Tensor) and not self.grad and unshared(output):
                return self._dispatch(event, output)  # held by nothing else: no copy needed
            return self._dispatch(event, map_tensors(lambda t: _fresh(t, self.grad), output))
        return hook

    def view(self, inv: Invoke, event):
        """This invoke's rows of a step's value: at step 0 its own positions too; at later steps
        the one new position of its rows; of the generated ids, its rows without the batch's
        extra left padding."""
        rows = self.rows[inv]
        if event[0] == GENERATOR:
            total = self.fired[event].shape[1]
            rows = Rows(rows.start, rows.stop, rows.pad, total)
        elif event[2] > 0:
            rows = Rows(rows.start, rows.stop)
        return self.view_rows(inv, event, rows)

    def _finish(self) -> None:
        for inv in self.invokes:
            waiting = inv.waiting
            if not inv.done and waiting and waiting[0] == "event" and waiting[1][2] > self.step \
                    and waiting[1][0] != GENERATOR:
                raise NNPatchIndexError(
                    f"{event_name(waiting[1])} was read, but the generation stopped after "
                    f"{self.step + 1} steps (an end-of-sequence token, or max_new_tokens="
                    f"{self.limit}); read steps inside `for step in tracer.all():`, which ends "
                    "with the generation, or pass min_new_tokens= to generate")
        super()._finish()


def _max_new_tokens(hf: torch.nn.Module, kwargs: dict, prompt_len: int) -> int:
    """How many steps `generate` makes at most, from its arguments or the model's config."""
    config = kwargs.get("generation_config") or getattr(hf, "generation_config", None)
    n = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None)
                   if "max_length" not in kwargs else None)
    if n is None:
        max_length = kwargs.get("max_length", getattr(config, "max_length", None) or 20)
        n = max_length - prompt_len
    if not isinstance(n, int) or n < 1:
        raise NNPatchValueError(
            f"model.generate needs max_new_tokens >= 1 (got {n!r}, for prompts {prompt_len} tokens "
            "long); pass max_new_tokens=N")
    return n


class Generator(torch.nn.Module):
    """`model.generator`: the generated ids pass through it once generation ends, so that an
    invoke can read them (`model.generator.output`)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids


class GeneratorEnvoy(Envoy):
    """The envoy of `model.generator`, whose output exists only in a generation."""

    def _read(self, kind: str):
        if self._invoke().steps is None:
            raise NNPatchError(
                f"model.generator.{kind} is what a generation produced, but this trace is one forward "
                "pass (model.trace); open `with model.generate(prompt, max_new_tokens=N):` to read "
                "the generated ids, or read model.lm_head.output here")
        return super()._read(kind)


def generate(model, inputs: tuple, kwargs: dict) -> GenerationTracer:
    """`model.generate(...)`: the tracer of a generation (see `GenerationTracer`)."""
    if getattr(model, "tokenizer", None) is None and not any(k in kwargs for k in _PROMPT_KEYWORDS) \
            and any(isinstance(x, str) for x in inputs):
        raise NNPatchTypeError("model.generate with string prompts needs the model's tokenizer: "
                               "nnpatch.LanguageModel(module, tokenizer=...)")
    if not hasattr(model._module, "generate"):
        raise NNPatchTypeError(
            f"model.generate runs the wrapped module's Hugging Face `generate`, and "
            f"{type(model._module).__name__} has none; wrap a causal language model")
    return GenerationTracer(model, inputs, kwargs)


