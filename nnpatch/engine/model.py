"""Wrapping a model: `Model` for any torch.nn.Module, `LanguageModel` for Hugging Face causal LMs.

A wrapped model is the root of an envoy tree that mirrors the module tree
(`model.transformer.h[3].mlp`), and the entry point of traces (`model.trace(...)`).

Example:
    >>> import torch, nnpatch
    >>> net = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> with net.trace(torch.ones(2, 4)):
    ...     hidden = net[0].output.save()
    >>> hidden.shape
    torch.Size([2, 4])
"""
from __future__ import annotations

import difflib
import inspect

from typing import Any

import torch

from .. import bundled
from ..errors import NNPatchTypeError, NNPatchValueError
from . import aliases, generation
from .batching import Batch, batch_generic, batch_prompts, forward_parameters, map_tensors
from .edit import EditTracer, edits_of
from .envoy import Envoy
from .devices import input_device, placement_error
from .inputs import check_prompts, invoke_rows, model_limits, model_sizes, token_rows
from .session import Session
from .tracing import Tracer


def _on_module(name: str, doc: str):
    """A wrapper method that calls the wrapped module's `name` and returns the wrapper."""
    def method(self, *args, **kwargs):
        getattr(self._module, name)(*args, **kwargs)
        return self
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"{doc}; returns this wrapper."
    return method


class Model(Envoy):
    """Wraps any torch.nn.Module for tracing. Attribute access walks the module tree."""

    def __init__(self, module: torch.nn.Module, rename: dict | None = None):
        if not isinstance(module, torch.nn.Module):
            raise NNPatchTypeError(f"Model() wraps a torch.nn.Module, got {type(module).__name__}")
        # A torch.compile'd model: traces run the module it compiled (hooks and interventions do
        # not compose with a compiled graph), so paths are the model's own, without `_orig_mod`.
        original = getattr(module, "_orig_mod", None)
        if isinstance(original, torch.nn.Module) and type(module).__name__ == "OptimizedModule":
            module = original
        super().__init__(module, "", self)
        object.__setattr__(self, "_accepts", forward_parameters(module))
        # `rename=`: extra names for modules (see `aliases`), checked before anything uses them
        object.__setattr__(self, "_rename", aliases.check(module, rename, set(dir(type(self)))))

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped torch module (call it, move it, read its config)."""
        return self._module

    # -- the wrapped module, nnsight-style: these act on it and return the wrapper ------------
    to = _on_module("to", "Move or cast the wrapped module (as `torch.nn.Module.to`)")
    cuda = _on_module("cuda", "Move the wrapped module to a CUDA device")
    cpu = _on_module("cpu", "Move the wrapped module to the CPU")
    half = _on_module("half", "Cast the wrapped module's floating-point parameters to float16")
    float = _on_module("float", "Cast the wrapped module's floating-point parameters to float32")
    double = _on_module("double", "Cast the wrapped module's floating-point parameters to float64")
    bfloat16 = _on_module("bfloat16", "Cast the wrapped module's floating-point parameters to bfloat16")
    eval = _on_module("eval", "Put the wrapped module in evaluation mode (no dropout)")
    train = _on_module("train", "Put the wrapped module in training mode (or evaluation mode with False)")
    requires_grad_ = _on_module("requires_grad_", "Set requires_grad of the wrapped module's parameters")

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go: its input embedding's device, else its first parameter's."""
        return input_device(self._module)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's floating-point weights: its input embedding's, else its first
        floating-point parameter's (torch's default dtype for a module with none)."""
        try:
            weight = self._module.get_input_embeddings().weight
            if weight.is_floating_point():
                return weight.dtype
        except (AttributeError, NotImplementedError):
            pass
        for p in self._module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    # -- entry points -------------------------------------------------------------------------
    def trace(self, *inputs: Any, scan: bool = False, **kwargs: Any):
        """Open a trace. With inputs, the body of the with-block is one invoke on them;
        without, the body holds `with tracer.invoke(...)` blocks that run batched together.
        `scan=True` computes shapes only, with fake tensors (see `scan`)."""
        return Tracer(self, inputs, kwargs, scan=scan)

    def scan(self, *inputs: Any, **kwargs: Any):
        """A trace that computes shapes, not values (fake tensors): `with model.scan(x):`."""
        return Tracer(self, inputs, kwargs, scan=True)

    def edit(self, *, inplace: bool = False):
        """Interventions applied to every later trace: `with model.edit() as (tracer, edited):`
        edits a copy (`edited`, sharing the torch module), `inplace=True` edits this wrapper
        (`with model.edit(inplace=True) as tracer:`); `clear_edits()` removes them (`edit`)."""
        return EditTracer(self, inplace)

    def clear_edits(self) -> None:
        """Remove every edit of this wrapper (`model.edit`)."""
        edits_of(self).clear()

    def session(self) -> Session:
        """Several traces in one block, holding the model for all of them (`session`)."""
        return Session(self)

    def of(self, invoke) -> Envoy:
        """The module tree as another invoke of the same trace sees it (read-only).

        Inside one invoke, `model.of(clean).transformer.h[3].output` waits for layer 3 and
        returns the `clean` invoke's rows there, e.g. to patch them in:

            with model.trace() as tracer:
                with tracer.invoke(clean_prompt) as clean:
                    pass
                with tracer.invoke(corrupt_prompt):
                    model.transformer.h[3].output[:] = model.of(clean).transformer.h[3].output
        """
        return Envoy(self._module, "", self, invoke)

    def __call__(self, *args, **kwargs):
        """Run the wrapped module untraced."""
        return self._module(*args, **kwargs)

    # -- the hand-off to the module (used by traces and sweeps) --------------------------------
    def _prepare(self, invokes: list[tuple[tuple, dict]]) -> Batch:
        """Batch the inputs of several invokes into one forward call."""
        return batch_generic(invokes)

    def _forward(self, batch: Batch):
        device = input_device(self._module)
        move = lambda t: t if t.device == device else t.to(device)  # noqa: E731
        args = map_tensors(move, batch.args)
        kwargs = {k: map_tensors(move, v) for k, v in batch.kwargs.items()}  # one level: values are tensors or flags
        try:
            return self._module(*args, **kwargs)
        except Exception:
            stranded = placement_error(self._module)  # weights left on meta: say which module
            if stranded is not None:
                raise stranded from None
            raise

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self._module).__name__})"


class LanguageModel(Model):
    """Wraps a Hugging Face causal language model and its tokenizer.

    `name_or_path_or_module` is a loaded model, a local folder, a bundled model name
    (see `nnpatch.models.available()`), or a hub id (loaded with `from_pretrained`).
    Invoke inputs may be a prompt, a list of prompts, token ids (list or integer tensor), a
    tokenizer output, or `input_ids=...` with an optional `attention_mask=...` (zeros mark
    padding, on either side). Prompts of different lengths are left-padded so that position -1
    is every prompt's last token; token ids given with a mask keep their own layout, so a
    right-padded row's tokens stay where they were given. A prompt longer than the model's
    context, a token id outside its vocabulary, float or 3-D ids, an empty prompt, and words the
    tokenizer does not know are errors that name them, raised before the model runs.
    """

    def __init__(self, name_or_path_or_module, tokenizer=None, rename: dict | None = None,
                 **from_pretrained_kwargs):
        if isinstance(name_or_path_or_module, torch.nn.Module):
            module = name_or_path_or_module
            if tokenizer is None:
                tokenizer = _tokenizer_beside(module)
        else:
            module, tokenizer = _load(str(name_or_path_or_module), tokenizer, from_pretrained_kwargs)
        super().__init__(module, rename=rename)
        object.__setattr__(self, "tokenizer", tokenizer)

    def generate(self, *inputs: Any, **kwargs: Any) -> generation.GenerationTracer:
        """Open a trace of a whole generation: `with model.generate(prompt, max_new_tokens=N)
        as tracer:`. Keywords other than input_ids / attention_mask go to Hugging Face's
        `generate` (do_sample, temperature, streamer, ...). Reads bind to the first step unless
        written in `for step in tracer.iter[...]:` or `tracer.all()`; `model.generator.output`
        is the generated ids. See `nnpatch.engine.generation` and docs/generation.md."""
        return generation.generate(self, inputs, kwargs)

    @property
    def generator(self) -> Envoy:
        """In a generation, `model.generator.output` is the generated ids (prompt and new
        tokens) of the invoke that reads it."""
        envoy = self.__dict__.get("_generator_envoy")
        if envoy is None:
            envoy = generation.GeneratorEnvoy(generation.Generator(), generation.GENERATOR, self)
            self.__dict__["_generator_envoy"] = envoy
        return envoy

    def _prepare(self, invokes):
        """One forward call for the invokes' prompts; each invoke's input is checked against the
        model's vocabulary and context before anything runs."""
        pad_id = self._pad_id()
        limits = self.__dict__.get("_limits")
        if limits is None:  # the config's sizes do not change: read them once
            limits = self.__dict__["_limits"] = (*model_limits(self._module), model_sizes(self._module))
        vocab_size, context, sizes = limits
        blocks, options = [], _forward_options(invokes, self._module)
        for i, (args, kwargs) in enumerate(invokes):
            if kwargs:
                kwargs = {k: v for k, v in kwargs.items() if k in _PROMPT_KEYWORDS}
            value, mask = _prompt_arguments(args, kwargs)
            where = f" (invoke {i} of {len(invokes)} in this forward pass)" if len(invokes) > 1 else ""
            block = invoke_rows(self.tokenizer, value, mask, pad_id=pad_id)
            check_prompts(block, vocab_size=vocab_size, context=context, where=where)
            blocks.append(block)
        batch = batch_prompts(blocks, pad_id, self._accepts, avoid=sizes,
                              limit=None if context is None else context[0])
        batch.kwargs.update(options)
        return batch

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None),
                     getattr(getattr(self._module, "config", None), "pad_token_id", None)):
            if isinstance(cand, int):
                return cand
        return 0

    def to_tokens(self, prompt) -> list[int]:
        """The token ids of one prompt, as an invoke would see them. A word the tokenizer does
        not know comes out as its unknown token here (a trace on such a prompt is an error)."""
        return token_rows(self.tokenizer, prompt, unknown_words="keep")[0]

    def to_str_tokens(self, prompt) -> list[str]:
        """One string per token of the prompt (for labels)."""
        ids = prompt if isinstance(prompt, list) and all(isinstance(i, int) for i in prompt) else self.to_tokens(prompt)
        return [self.tokenizer.decode([i]) for i in ids]


_PROMPT_KEYWORDS = ("input_ids", "attention_mask")


def _forward_options(invokes, module: torch.nn.Module) -> dict:
    """Keyword arguments other than the prompt (`output_attentions=True`) go to the model's
    forward; the invokes of one forward pass must agree on them."""
    if all(key in _PROMPT_KEYWORDS for _, kwargs in invokes for key in kwargs):
        return {}
    try:
        parameters = inspect.signature(module.forward).parameters.values()
        accepts = {p.name for p in parameters if p.kind is not p.VAR_KEYWORD}
        if any(p.kind is p.VAR_KEYWORD for p in parameters):  # **kwargs: the ones HF documents
            accepts |= _documented_kwargs()
    except (TypeError, ValueError):
        accepts = set()
    options: dict = {}
    for i, (_, kwargs) in enumerate(invokes):
        for key, value in kwargs.items():
            if key in _PROMPT_KEYWORDS:
                continue
            if accepts and key not in accepts:
                close = difflib.get_close_matches(key, sorted(accepts), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise NNPatchTypeError(
                    f"the keyword {key!r} is neither a prompt keyword ({', '.join(_PROMPT_KEYWORDS)}) nor "
                    f"an argument of the model's forward; {hint}it takes {', '.join(sorted(accepts))}")
            if key in options and not _same(options[key], value):
                raise NNPatchValueError(
                    f"the invokes of one forward pass give different {key}= ({options[key]!r} and "
                    f"{value!r}); forward arguments apply to the whole batch, so give them once, to trace()")
            options[key] = value
    return options


def _documented_kwargs() -> set[str]:
    """The keyword arguments a Hugging Face forward takes through **kwargs."""
    names = {"output_attentions", "output_hidden_states", "return_dict"}
    try:
        from transformers.utils import TransformersKwargs
        names |= set(TransformersKwargs.__annotations__)
    except ImportError:
        pass
    return names


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a is b or a == b


def _prompt_arguments(args: tuple, kwargs: dict):
    """(prompt, attention mask or None) of one LanguageModel invoke's arguments: one positional
    input (a prompt, a list of prompts, token ids or a tokenizer output) or input_ids=, and
    optionally attention_mask= with token ids."""
    if len(args) == 1 and not kwargs:  # the common case: one prompt
        return args[0], None
    extra = sorted(set(kwargs) - set(_PROMPT_KEYWORDS))
    if extra:
        raise NNPatchTypeError(
            f"a LanguageModel invoke got unexpected keyword inputs {extra}; it takes one prompt (a "
            "string, a list of strings, token ids or a tokenizer output), or input_ids=... with "
            "an optional attention_mask=...")
    if len(args) > 1 or (args and "input_ids" in kwargs):
        raise NNPatchTypeError(
            f"a LanguageModel invoke takes exactly one input (a prompt, a list of prompts, token ids "
            f"or a tokenizer output), got {len(args)} positional inputs"
            + (" and input_ids=" if "input_ids" in kwargs else "")
            + "; put several prompts in one list, or give each its own invoke")
    if not args and "input_ids" not in kwargs:
        raise NNPatchTypeError(
            "a LanguageModel invoke needs an input: a prompt, a list of prompts, token ids or a "
            f"tokenizer output, or input_ids=...; got {sorted(kwargs) or 'nothing'}")
    return (args[0] if args else kwargs["input_ids"]), kwargs.get("attention_mask")


def _tokenizer_beside(module):
    path = getattr(getattr(module, "config", None), "_name_or_path", "")
    if path:
        import os
        if os.path.isdir(path):
            from transformers import AutoTokenizer
            try:
                return AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                return None
    return None


def _load(name: str, tokenizer, kwargs):
    import contextlib
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer
    quiet = contextlib.nullcontext()
    if not os.path.exists(name):
        if name in bundled.available():
            name, quiet = str(bundled.path(name)), bundled.quiet_loading()  # no "Loading weights" bar
    try:
        with quiet:
            module = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise NNPatchValueError(
            f"could not load {name!r} with from_pretrained ({str(e).strip().splitlines()[0]}). "
            "If this machine has no network, give a local folder that holds config.json and the "
            "weights, or a loaded module, or one of the bundled models "
            f"{bundled.available()} (e.g. nnpatch.models.load('ioi'))") from None
    module.eval()
    return module, tokenizer
