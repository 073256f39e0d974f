"""Standard sites: the usual places of a transformer, named once and mapped to module paths.

A site is a module path from `named_modules()` plus `input` or `output` (and, when that value is a
tuple, which element): `transformer.h.3.mlp.output`. This module is only a table from the standard
names (`resid_pre`, `resid_mid`, `resid_post`, `attn_out`, `mlp_out`, `head_out`) to such sites,
per architecture and per layer. Sweeps, errors, result labels and caches all use the site's
string, never a second naming scheme.

    >>> import nnpatch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50))
    >>> table = nnpatch.sites(gpt2)
    >>> str(table["mlp_out"][1]), str(table["head_out"][0])
    ('transformer.h.1.mlp.output', 'transformer.h.0.attn.c_proj.input')

Another architecture takes a few lines; paths are relative to one block:

    >>> nnpatch.register_sites("my_net", blocks="layers", n_heads=8, sites={
    ...     "resid_pre": "input", "resid_post": "output", "attn_out": "attn.output",
    ...     "mlp_out": "ffn.output", "head_out": "attn.proj.input"})
"""
from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch

from ..engine import Model
from ..engine.inputs import input_slot, read_input, with_input
from ..errors import NNPatchAttributeError, NNPatchIndexError, NNPatchValueError

STANDARD = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out")
HEAD_SITES = ("head_out",)  # sites whose last dimension splits into attention heads


@dataclass(frozen=True)
class Site:
    """One place in the model: a module path, its input or output, and which tuple element.

    `index` is the positional argument of an input, or the element of a tuple output; an output
    that is a plain tensor is the value itself. `heads` is set on head sites: the last dimension
    of the value splits into that many heads.

    Some residual-stream values are no module's output: GPT-2's resid_mid is `input + attn.output`,
    read at `ln_2.input`, but replacing `ln_2`'s input would leave the residual branch unpatched.
    Such a site is read at `path` and written through `via` (the addend's module output):
    patching sets `via` to the wanted value minus `stream` (the other addend, the block input).
    """

    path: str
    kind: str  # "input" | "output"
    index: int = 0
    heads: int | None = None
    layer: int | None = None
    via: "Site | None" = None  # where patches are written, when not at the site itself
    stream: "Site | None" = None  # the value `via` is added to

    def __str__(self) -> str:
        return f"{self.path}.{self.kind}" + (f"[{self.index}]" if self.index else "")

    # -- reading and replacing the value inside a hook --------------------------------------
    def read(self, args: tuple, kwargs: dict, output: Any = None) -> torch.Tensor:
        if self.kind == "output":
            return output[self.index] if isinstance(output, (tuple, list)) else output
        return read_input(args, kwargs, self._slot(args, kwargs))

    def with_input(self, args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
        """The (args, kwargs) of a call whose site input is replaced by `value`."""
        return with_input(args, kwargs, self._slot(args, kwargs), value)

    def with_output(self, output: Any, value: torch.Tensor) -> Any:
        """The module output with the site's element replaced by `value`."""
        if isinstance(output, tuple):
            return output[:self.index] + (value,) + output[self.index + 1:]
        if isinstance(output, list):
            return output[:self.index] + [value] + output[self.index + 1:]
        return value

    def _slot(self, args: tuple, kwargs: dict):
        # Some blocks receive their hidden state by keyword (GPT-J's attention: hidden_states=...).
        slot = input_slot(args, kwargs, self.index)
        if slot is None:
            raise NNPatchIndexError(f"the call of {self.path!r} has no input {self.index}; "
                                    f"keyword inputs were {sorted(kwargs)}")
        return slot


# A site spec relative to one block: "mlp.output", "attn.c_proj.input", "input", "attn.output[1]";
# or a function of the model config returning such a string, or None where the site does not exist.
SiteSpec = Union[str, Callable[[Any], Union[str, None]], None]


@dataclass(frozen=True)
class _Layout:
    """How one architecture is built: where its blocks are and where each site lies in a block."""

    blocks: tuple[str, ...]  # candidate paths of the block list (the first one present is used)
    sites: dict[str, SiteSpec]
    n_heads: int | None = None  # None: config.num_attention_heads
    unembed: tuple[str, ...] = ("lm_head", "embed_out")
    kv_cache: bool = False  # a Hugging Face decoder: past_key_values lets a run start mid-prompt


_REGISTRY: dict[str, _Layout] = {}


def register_sites(architecture: str, *, blocks: str | Sequence[str], sites: Mapping[str, SiteSpec],
                   n_heads: int | None = None, unembed: str | Sequence[str] | None = None,
                   kv_cache: bool = False) -> None:
    """Teach nnpatch the standard sites of another architecture.

    `architecture` is the Hugging Face `config.model_type` (e.g. "phi3") or, for a plain torch
    module, its class name. `blocks` is the path of the list of transformer blocks (several
    candidates may be given; a path may also be the end of the real path, e.g. "encoder.layer"
    matches "bert.encoder.layer"). Each site is a path relative to one block ending in `input` or
    `output`, optionally followed by `[i]` for a tuple element: "mlp.output", "attn.o_proj.input",
    or just "input" for the block's own input. A residual value that no module outputs is read at
    one place and written through an addend: "ln_2.input = input + attn.output" (patching it sets
    attn's output to the wanted value minus the block input). `head_out` is split into `n_heads` heads
    (default: `config.num_attention_heads`). `unembed` names the module that maps the final hidden
    state to logits; with it (and a base model that takes `input_ids`) sweeps skip the layers a
    patch cannot change. `kv_cache=True` declares a Hugging Face causal decoder whose
    `past_key_values` lets a run start at the patched position.

        >>> import nnpatch
        >>> nnpatch.register_sites("my_net", blocks="layers", sites={
        ...     "resid_pre": "input", "resid_post": "output", "mlp_out": "mlp.output"})
    """
    if isinstance(blocks, str):
        blocks = (blocks,)
    if isinstance(unembed, str):
        unembed = (unembed,)
    for name, spec in sites.items():
        if isinstance(spec, str):
            _parse(spec, name)
    _REGISTRY[architecture] = _Layout(tuple(blocks), dict(sites), n_heads,
                                      tuple(unembed) if unembed else _Layout.unembed, kv_cache)


class Sites(Mapping):
    """The standard sites of one model: `sites[name][layer]` is a `Site`.

    Also knows what a fast sweep needs: `blocks` (path of the block list), `n_layers`, `n_heads`,
    `base` (the module that embeds `input_ids` and runs the blocks), `unembed` (the module that
    maps the final hidden state to logits) and `kv_cache`.
    """

    def __init__(self, architecture: str, table: dict[str, tuple[Site, ...]], *, blocks: str,
                 n_layers: int, n_heads: int | None, base: str | None, unembed: str | None,
                 kv_cache: bool):
        self.architecture = architecture
        self._table = table
        self.blocks, self.n_layers, self.n_heads = blocks, n_layers, n_heads
        self.base, self.unembed, self.kv_cache = base, unembed, kv_cache

    def __getitem__(self, name: str) -> tuple[Site, ...]:
        if name not in self._table:
            close = difflib.get_close_matches(name, list(self._table), n=3, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            missing = "" if name not in STANDARD else (
                f"; {name!r} does not exist in this architecture's blocks")
            raise NNPatchValueError(
                f"site {name!r} is not available for {self.architecture}{hint}{missing}. "
                f"Available sites: {', '.join(self._table)}") from None
        return self._table[name]

    def __contains__(self, name) -> bool:
        return name in self._table

    def get(self, name, default=None):
        return self._table.get(name, default)

    def __iter__(self):
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        width = max(len(n) for n in self._table)
        lines = [f"Sites({self.architecture}, {self.n_layers} layers"
                 + (f", {self.n_heads} heads" if self.n_heads else "") + ")"]
        block = f"{self.blocks}.0"

        def template(site):
            return str(site).replace(block, f"{self.blocks}.{{layer}}", 1)
        for name, per_layer in self._table.items():
            site = per_layer[0]
            written = f"  (= {template(site.stream)} + {template(site.via)})" if site.via else ""
            lines.append(f"  {name:<{width}}  {template(site)}{written}")
        return "\n".join(lines)


def sites(model) -> Sites:
    """The standard sites of a model, per layer, as module paths.

        >>> import nnpatch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32,
        ...     intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
        >>> [str(s) for s in nnpatch.sites(llama)["resid_mid"]]
        ['model.layers.0.post_attention_layernorm.input', 'model.layers.1.post_attention_layernorm.input']

    `model` is an nnpatch model or a torch module. Supported out of the box: GPT-2, GPT-NeoX,
    GPT-J, Llama, Mistral, Qwen2/3, Gemma 1/2/3 and BERT-style encoders (BERT, RoBERTa,
    XLM-RoBERTa, ELECTRA); `register_sites` adds others.
    """
    module = model.module if isinstance(model, Model) else model
    config = getattr(module, "config", None)
    architecture = getattr(config, "model_type", None) or type(module).__name__
    if architecture not in _REGISTRY and type(module).__name__ in _REGISTRY:
        architecture = type(module).__name__
    if architecture not in _REGISTRY:
        raise NNPatchValueError(
            f"nnpatch has no standard sites for architecture {architecture!r} "
            f"({type(module).__name__}); known: {', '.join(sorted(_REGISTRY))}. Register them in a few "
            f"lines: nnpatch.register_sites({architecture!r}, blocks='<path of the block list>', "
            "sites={'resid_pre': 'input', 'resid_post': 'output', 'mlp_out': 'mlp.output', ...})")
    layout = _REGISTRY[architecture]
    names = dict(module.named_modules())
    blocks = _find_blocks(names, layout.blocks, architecture)
    n_layers = len(names[blocks])
    n_heads = layout.n_heads or getattr(config, "num_attention_heads", None)

    table: dict[str, tuple[Site, ...]] = {}
    for name, spec in layout.sites.items():
        if callable(spec):
            spec = spec(config)
        if spec is None:
            continue
        read, sum_of = _parse(spec, name)

        def site(rel, kind, index, layer, **extra):
            path = f"{blocks}.{layer}" + (f".{rel}" if rel else "")
            if path not in names:
                close = difflib.get_close_matches(path, list(names), n=3, cutoff=0.5)
                raise NNPatchAttributeError(
                    f"site {name!r} of {architecture} should be at {path!r}, but the model has no "
                    f"such module (closest: {', '.join(close) or 'none'}); fix the spec {spec!r} "
                    "with nnpatch.register_sites")
            return Site(path, kind, index, layer=layer, **extra)

        heads = n_heads if name in HEAD_SITES else None
        table[name] = tuple(
            site(*read, layer, heads=heads,
                 stream=site(*sum_of[0], layer) if sum_of else None,
                 via=site(*sum_of[1], layer) if sum_of else None)
            for layer in range(n_layers))

    unembed = next((u for u in layout.unembed if u in names), None)
    base = _find_base(names, blocks) if unembed is not None else None
    return Sites(architecture, table, blocks=blocks, n_layers=n_layers, n_heads=n_heads,
                 base=base, unembed=unembed, kv_cache=layout.kv_cache and base is not None)


_SPEC = re.compile(r"^(?:(?P<rel>[\w.]+)\.)?(?P<kind>input|output)(?:\[(?P<index>\d+)\])?$")

Where = tuple[str, str, int]  # (path relative to the block, "input" | "output", tuple element)


def _parse(spec: str, name: str) -> tuple[Where, tuple[Where, Where] | None]:
    """"mlp.output" -> where to read; "ln_2.input = input + attn.output" -> also the two addends,
    the second being where patches are written."""
    read, _, total = (part.strip() for part in spec.partition("="))
    terms = [t.strip() for t in total.split("+")] if total else []
    if total and len(terms) != 2:
        raise NNPatchValueError(f"site {name!r}: {spec!r} must read '<site> = <stream> + <written addend>', "
                                "e.g. 'ln_2.input = input + attn.output'")
    wheres = [_where(t, name, spec) for t in [read] + terms]
    return wheres[0], (tuple(wheres[1:]) if terms else None)


def _where(text: str, name: str, spec: str) -> Where:
    m = _SPEC.match(text)
    if not m:
        raise NNPatchValueError(
            f"site {name!r}: cannot read {text!r} in {spec!r}; write a path relative to one block that "
            "ends in 'input' or 'output', optionally with a tuple element: 'mlp.output', "
            "'attn.o_proj.input', 'input', 'attn.output[0]'")
    return m["rel"] or "", m["kind"], int(m["index"] or 0)


def _find_blocks(names: dict[str, torch.nn.Module], candidates: Sequence[str], architecture: str) -> str:
    for cand in candidates:
        hits = [p for p, mod in names.items()
                if isinstance(mod, torch.nn.ModuleList) and (p == cand or p.endswith("." + cand))]
        if hits:
            return min(hits, key=len)
    lists = [p for p, mod in names.items() if isinstance(mod, torch.nn.ModuleList)]
    raise NNPatchAttributeError(
        f"{architecture}: no block list at {' or '.join(map(repr, candidates))}; the model's module "
        f"lists are {lists or 'none'}; give the right one with nnpatch.register_sites(..., blocks=...)")


def _find_base(names: dict[str, torch.nn.Module], blocks: str) -> str | None:
    """The outermost module below the root that holds the blocks and embeds `input_ids`."""
    parts = blocks.split(".")
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        try:
            params = inspect.signature(names[path].forward).parameters
        except (TypeError, ValueError):
            continue
        if "input_ids" in params:
            return path
    return None


def _register_builtins() -> None:
    llama_like = {"resid_pre": "input", "resid_mid": "post_attention_layernorm.input = input + self_attn.output",
                  "resid_post": "output", "attn_out": "self_attn.output",
                  "mlp_out": "mlp.output", "head_out": "self_attn.o_proj.input"}
    for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        register_sites(arch, blocks="layers", sites=llama_like, kv_cache=True)
    # Gemma 2 and 3 normalise each sublayer's output before adding it to the residual stream.
    gemma2 = {"resid_pre": "input",
              "resid_mid": "pre_feedforward_layernorm.input = input + post_attention_layernorm.output",
              "resid_post": "output", "attn_out": "post_attention_layernorm.output",
              "mlp_out": "post_feedforward_layernorm.output", "head_out": "self_attn.o_proj.input"}
    for arch in ("gemma2", "gemma3_text"):
        register_sites(arch, blocks="layers", sites=gemma2, kv_cache=True)
    register_sites("gpt2", blocks="h", kv_cache=True, sites={
        "resid_pre": "input", "resid_mid": "ln_2.input = input + attn.output", "resid_post": "output",
        "attn_out": "attn.output", "mlp_out": "mlp.output", "head_out": "attn.c_proj.input"})
    register_sites("gpt_neox", blocks="layers", kv_cache=True, sites={
        "resid_pre": "input",
        # With the default parallel residual, attention and MLP both read resid_pre.
        "resid_mid": lambda cfg: None if getattr(cfg, "use_parallel_residual", True)
        else "post_attention_layernorm.input = input + attention.output",
        "resid_post": "output", "attn_out": "attention.output", "mlp_out": "mlp.output",
        "head_out": "attention.dense.input"})
    register_sites("gptj", blocks="h", kv_cache=True, sites={
        "resid_pre": "input", "resid_post": "output", "attn_out": "attn.output",
        "mlp_out": "mlp.output", "head_out": "attn.out_proj.input"})
    # BERT is post-norm: what a sublayer adds is its output dense layer, before the LayerNorm.
    bert = {"resid_pre": "input", "resid_mid": "attention.output", "resid_post": "output",
            "attn_out": "attention.output.dense.output", "mlp_out": "output.dense.output",
            "head_out": "attention.output.dense.input"}
    for arch in ("bert", "roberta", "xlm-roberta", "electra", "camembert"):
        register_sites(arch, blocks="encoder.layer", sites=bert, unembed=("cls", "lm_head", "generator_lm_head"))


_register_builtins()

