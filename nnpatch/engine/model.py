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

from typing import Any

import torch

from .. import bundled
from ..errors import NNPatchError
from .batching import Batch, batch_generic, batch_prompts, forward_parameters, map_tensors
from .envoy import Envoy
from .inputs import input_device, invoke_rows, token_rows
from .tracing import Tracer


class Model(Envoy):
    """Wraps any torch.nn.Module for tracing. Attribute access walks the module tree."""

    def __init__(self, module: torch.nn.Module):
        if not isinstance(module, torch.nn.Module):
            raise NNPatchError(f"Model() wraps a torch.nn.Module, got {type(module).__name__}")
        super().__init__(module, "", self)
        object.__setattr__(self, "_accepts", forward_parameters(module))
        object.__setattr__(self, "_event_order", None)

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped torch module (call it, move it, read its config)."""
        return self._module

    # -- entry points -------------------------------------------------------------------------
    def trace(self, *inputs: Any, **kwargs: Any):
        """Open a trace. With inputs, the body of the with-block is one invoke on them;
        without, the body holds `with tracer.invoke(...)` blocks that run batched together."""
        return Tracer(self, inputs, kwargs)

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
        args, kwargs = map_tensors(lambda t: t.to(device), (batch.args, batch.kwargs))
        return self._module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self._module).__name__})"


class LanguageModel(Model):
    """Wraps a Hugging Face causal language model and its tokenizer.

    `name_or_path_or_module` is a loaded model, a local folder, a bundled model name
    (see `nnpatch.models.available()`), or a hub id (loaded with `from_pretrained`).
    Invoke inputs may be a prompt, a list of prompts, token ids (list or tensor), or a
    tokenizer output; prompts of different lengths are left-padded so that position -1 is
    every prompt's last token.
    """

    def __init__(self, name_or_path_or_module, tokenizer=None, **from_pretrained_kwargs):
        if isinstance(name_or_path_or_module, torch.nn.Module):
            module = name_or_path_or_module
            if tokenizer is None:
                tokenizer = _tokenizer_beside(module)
        else:
            module, tokenizer = _load(str(name_or_path_or_module), tokenizer, from_pretrained_kwargs)
        super().__init__(module)
        object.__setattr__(self, "tokenizer", tokenizer)

    def _prepare(self, invokes):
        rows = []
        for args, kwargs in invokes:
            if kwargs or len(args) != 1:
                raise NNPatchError(
                    "a LanguageModel invoke takes exactly one input (a prompt, a list of prompts, "
                    f"token ids or a tokenizer output), got {len(args)} positional and "
                    f"{sorted(kwargs)} keyword inputs")
            rows.append(invoke_rows(self.tokenizer, args[0]))
        return batch_prompts(self.tokenizer, rows, self._pad_id(), self._accepts)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None),
                     getattr(getattr(self._module, "config", None), "pad_token_id", None)):
            if isinstance(cand, int):
                return cand
        return 0

    def to_tokens(self, prompt) -> list[int]:
        """The token ids of one prompt, as an invoke would see them."""
        return token_rows(self.tokenizer, prompt)[0]

    def to_str_tokens(self, prompt) -> list[str]:
        """One string per token of the prompt (for labels)."""
        ids = prompt if isinstance(prompt, list) and all(isinstance(i, int) for i in prompt) else self.to_tokens(prompt)
        return [self.tokenizer.decode([i]) for i in ids]


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
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not os.path.exists(name):
        if name in bundled.available():
            name = str(bundled.path(name))
    try:
        module = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise NNPatchError(
            f"could not load {name!r} with from_pretrained ({str(e).strip().splitlines()[0]}). "
            "If this machine has no network, give a local folder that holds config.json and the "
            "weights, or a loaded module, or one of the bundled models "
            f"{bundled.available()} (e.g. nnpatch.models.load('ioi'))") from None
    module.eval()
    return module, tokenizer
