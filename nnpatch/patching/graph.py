"""The computational graph of a transformer, as circuits see it: nodes and the edges between them.

Nodes are the things that write into the residual stream: the input embedding (`input`), every
attention head (`a{layer}.h{head}`), every MLP (`m{layer}`); the logits (`logits`) read from it.
An edge is one upstream node's output as it reaches one downstream node's input through the
residual stream. Attention heads read the stream three times, so a head receives edges on its
query, key and value inputs separately: `a3.h1<q>`, `a3.h1<k>`, `a3.h1<v>` (in a model with
grouped key/value heads, the key and value receivers are the key/value heads: `a3.h0<k>` is key
head 0, shared by several query heads). Edge names are `sender->receiver`: `a0.h2->a3.h1<k>`.

The graph is built from the standard site table (`sites.py`: blocks, `head_out`, `mlp_out`) plus
four more module paths per architecture, kept in this module: the norm in front of attention, the
query/key/value projections and how their outputs split into heads, the norm in front of the MLP,
and the final norm. GPT-2, GPT-NeoX, Llama, Mistral, Qwen2/3 and Gemma are built in;
`register_graph` adds others (their `register_sites` entry must exist).

    >>> import nnpatch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50))
    >>> g = nnpatch.graph(gpt2)
    >>> len(g.senders), len(g.receivers), len(g.edges)
    (11, 27, 110)
    >>> g.edges[0]
    'input->a0.h0<q>'
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..engine import Model
from ..errors import NNPatchAttributeError, NNPatchValueError
from .sites import Site, sites as standard_sites

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class _GraphLayout:
    """Where, relative to one block, attention and the MLP read the residual stream."""

    attn_norm: str  # the norm whose input is attention's residual input
    qkv: tuple[str, str, str] | str  # three projections, or one fused projection
    fused: str | None  # how a fused projection's columns split: "qkv" (GPT-2) | "per_head" (NeoX)
    mlp_norm: str
    final_norm: tuple[str, ...]  # absolute paths, the first present is used
    parallel: Callable[[Any], bool] = lambda config: False  # MLP reads the block input


_LAYOUTS: dict[str, _GraphLayout] = {}


def register_graph(architecture: str, *, attn_norm: str, qkv, mlp_norm: str, final_norm,
                   fused: str | None = None, parallel: Callable[[Any], bool] | bool = False) -> None:
    """Teach nnpatch the circuit graph of an architecture whose sites are registered.

    Paths are relative to one block, except `final_norm` (from the model root; several candidates
    may be given). `qkv` is three projection paths (query, key, value), or one fused projection
    with `fused="qkv"` (columns [all queries | all keys | all values]) or `fused="per_head"`
    (columns [head 0: q k v | head 1: q k v | ...]). `parallel=True` (or a function of the config)
    says the MLP reads the block input, not the stream after attention.

        >>> import nnpatch
        >>> nnpatch.register_graph("my_net", attn_norm="norm1", qkv=("attn.q", "attn.k", "attn.v"),
        ...                        mlp_norm="norm2", final_norm="final_norm")
    """
    if isinstance(qkv, str) and fused not in ("qkv", "per_head"):
        raise NNPatchValueError(f"{architecture}: a fused projection {qkv!r} needs fused='qkv' or "
                                "fused='per_head' to say how its columns split into heads")
    if not isinstance(qkv, str) and len(tuple(qkv)) != 3:
        raise NNPatchValueError(f"{architecture}: qkv must be three paths (query, key, value), got {qkv!r}")
    final = (final_norm,) if isinstance(final_norm, str) else tuple(final_norm)
    par = parallel if callable(parallel) else (lambda config, p=bool(parallel): p)
    _LAYOUTS[architecture] = _GraphLayout(attn_norm, qkv if isinstance(qkv, str) else tuple(qkv),
                                          fused if isinstance(qkv, str) else None, mlp_norm, final, par)


def _register_builtins() -> None:
    for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        register_graph(arch, attn_norm="input_layernorm",
                       qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                       mlp_norm="post_attention_layernorm", final_norm="model.norm")
    register_graph("gpt2", attn_norm="ln_1", qkv="attn.c_attn", fused="qkv", mlp_norm="ln_2",
                   final_norm="transformer.ln_f")
    register_graph("gpt_neox", attn_norm="input_layernorm", qkv="attention.query_key_value",
                   fused="per_head", mlp_norm="post_attention_layernorm",
                   final_norm="gpt_neox.final_layer_norm",
                   parallel=lambda config: getattr(config, "use_parallel_residual", True))


_register_builtins()


@dataclass(frozen=True)
class Projection:
    """One module computing queries, keys and/or values, and the receivers reading from it."""

    path: str
    receivers: tuple[int, ...]  # receiver indices
    columns: tuple[torch.Tensor, ...]  # per receiver: its output columns [head_dim]


@dataclass(frozen=True)
class LayerReceivers:
    """The paths a layer's receivers are hooked at."""

    attn_norm: str
    projections: tuple[Projection, ...]
    mlp_norm: str
    mlp: int  # receiver index of the MLP


class Graph:
    """Nodes and edges of one model, and the module paths that realise them.

    `senders` are node names in forward order (`input`, heads and MLP of layer 0, ...),
    `receivers` the nodes' inputs (`a1.h0<q>`, ..., `m1`, `logits`), `edges` every
    `sender->receiver` name with the sender upstream. `upstream[r, s]` is True when sender `s`
    feeds receiver `r` (the edge exists). `edge_index` maps an edge name to (receiver, sender).
    """

    def __init__(self, module: torch.nn.Module):
        table = standard_sites(module)
        arch = table.architecture
        if arch not in _LAYOUTS:
            raise NNPatchValueError(
                f"nnpatch has no circuit graph for architecture {arch!r}; known: {', '.join(sorted(_LAYOUTS))}. "
                "Gemma 2/3 normalise attention's output as a whole before adding it to the residual "
                "stream, so their heads' contributions do not add up; for another architecture call "
                f"nnpatch.register_graph({arch!r}, attn_norm=..., qkv=(...), mlp_norm=..., final_norm=...)")
        layout = _LAYOUTS[arch]
        for name in ("head_out", "mlp_out", "resid_pre"):
            if name not in table:
                raise NNPatchValueError(f"the circuit graph needs site {name!r}, which {arch}'s site table lacks; "
                                        "add it with nnpatch.register_sites")
        names = dict(module.named_modules())
        config = getattr(module, "config", None)
        self.architecture = arch
        self.model_name = getattr(config, "_name_or_path", "") or type(module).__name__
        self.n_layers, self.n_heads = table.n_layers, table.n_heads
        self.parallel = bool(layout.parallel(config))
        self.blocks = table.blocks
        self.resid_sites: tuple[Site, ...] = table["resid_pre"]  # each block's input
        self.input_site: Site = table["resid_pre"][0]
        self.head_sites: tuple[Site, ...] = table["head_out"]
        self.mlp_sites: tuple[Site, ...] = table["mlp_out"]

        def path(rel, layer):
            p = f"{table.blocks}.{layer}.{rel}"
            if p not in names:
                close = difflib.get_close_matches(p, list(names), n=3, cutoff=0.5)
                raise NNPatchAttributeError(
                    f"circuit graph of {arch}: expected module {p!r}, the model has none (closest: "
                    f"{', '.join(close) or 'none'}); fix it with nnpatch.register_graph({arch!r}, ...)")
            return p

        self.final_norm = next((p for p in layout.final_norm if p in names), None)
        if self.final_norm is None:
            raise NNPatchAttributeError(f"circuit graph of {arch}: no final norm at {' or '.join(layout.final_norm)}; "
                                        f"give it with nnpatch.register_graph({arch!r}, final_norm=...)")
        self.head_dim = self._head_dim(names)
        self.n_kv = self._n_kv(names, path, layout)

        senders = ["input"]
        self.sender_layer = [-1]
        receivers: list[str] = []
        self.receiver_layer: list[int] = []
        self.layers: list[LayerReceivers] = []
        for layer in range(self.n_layers):
            first = len(receivers)
            receivers += [f"a{layer}.h{h}<q>" for h in range(self.n_heads)]
            receivers += [f"a{layer}.h{g}<{w}>" for w in ("k", "v") for g in range(self.n_kv)]
            idx = {name: first + i for i, name in enumerate(receivers[first:])}
            projections = []
            if isinstance(layout.qkv, str):
                cols = [self._columns(layout.fused, w, h) for w in QKV for h in range(self._heads(w))]
                recv = [idx[f"a{layer}.h{h}<{w}>"] for w in QKV for h in range(self._heads(w))]
                projections.append(Projection(path(layout.qkv, layer), tuple(recv), tuple(cols)))
            else:
                for w, rel in zip(QKV, layout.qkv):
                    heads = range(self._heads(w))
                    projections.append(Projection(
                        path(rel, layer), tuple(idx[f"a{layer}.h{h}<{w}>"] for h in heads),
                        tuple(torch.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in heads)))
            receivers.append(f"m{layer}")
            self.layers.append(LayerReceivers(path(layout.attn_norm, layer), tuple(projections),
                                              path(layout.mlp_norm, layer), len(receivers) - 1))
            self.receiver_layer += [layer] * (len(receivers) - first)
            senders += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
            self.sender_layer += [layer] * (self.n_heads + 1)
        receivers.append("logits")
        self.receiver_layer.append(self.n_layers)
        self.senders, self.receivers = senders, receivers
        self.sender_index = {s: i for i, s in enumerate(senders)}
        self.receiver_index = {r: i for i, r in enumerate(receivers)}

        up = torch.zeros(len(receivers), len(senders), dtype=torch.bool)
        s_layer = torch.tensor(self.sender_layer)
        s_mlp = torch.tensor([s.startswith("m") for s in senders])
        for r, (name, layer) in enumerate(zip(receivers, self.receiver_layer)):
            up[r] = s_layer < layer
            if name.startswith("m") and not self.parallel:
                up[r] |= (s_layer == layer) & ~s_mlp  # the MLP reads its own layer's heads
        self.upstream = up  # [receivers, senders]
        rs = up.nonzero().tolist()
        self.edge_pairs = [(r, s) for r, s in rs]
        # Edges sorted by sender, then receiver: reads like the forward pass.
        self.edge_pairs.sort(key=lambda e: (e[1], e[0]))
        self.edges = [f"{senders[s]}->{receivers[r]}" for r, s in self.edge_pairs]
        self.edge_index = {e: rs for e, rs in zip(self.edges, self.edge_pairs)}

    # -- shapes --------------------------------------------------------------------------------
    def _heads(self, which: str) -> int:
        return self.n_heads if which == "q" else self.n_kv

    def _columns(self, fused: str, which: str, head: int) -> torch.Tensor:
        d, w = self.head_dim, QKV.index(which)
        if fused == "qkv":
            start = w * self.n_heads * d + head * d
        else:
            start = head * 3 * d + w * d
        return torch.arange(start, start + d)

    def _head_dim(self, names) -> int:
        width = _out_features(names[self.head_sites[0].path], "in")
        if width is None or width % self.n_heads:
            raise NNPatchValueError(f"cannot tell the head size of {self.head_sites[0].path!r} "
                                    f"({width} inputs, {self.n_heads} heads)")
        return width // self.n_heads

    def _n_kv(self, names, path, layout) -> int:
        if isinstance(layout.qkv, str):
            return self.n_heads
        width = _out_features(names[path(layout.qkv[1], 0)], "out")
        return width // self.head_dim

    # -- names ---------------------------------------------------------------------------------
    def sender(self, name: str) -> int:
        return _lookup(self.sender_index, name, "sender", "input, a{layer}.h{head}, m{layer}")

    def receiver(self, name: str) -> int:
        return _lookup(self.receiver_index, name, "receiver", "a{layer}.h{head}<q|k|v>, m{layer}, logits")

    def edge(self, name: str) -> tuple[int, int]:
        """(receiver, sender) of an edge name `sender->receiver`."""
        if name in self.edge_index:
            return self.edge_index[name]
        sender, sep, receiver = name.partition("->")
        if not sep:
            raise NNPatchValueError(f"edge {name!r} is not of the form 'sender->receiver', e.g. 'a0.h1->m2'")
        s, r = self.sender(sender.strip()), self.receiver(receiver.strip())
        if not self.upstream[r, s]:
            raise NNPatchValueError(
                f"edge {name!r} does not exist: sender {self.senders[s]} (layer {self.sender_layer[s]}) is not "
                f"upstream of receiver {self.receivers[r]} (layer {self.receiver_layer[r]}); a sender must "
                "come before the receiver in the forward pass")
        return r, s

    def __repr__(self) -> str:
        return (f"Graph({self.architecture}, {self.n_layers} layers, {self.n_heads} heads"
                + (f", {self.n_kv} key/value heads" if self.n_kv != self.n_heads else "")
                + f": {len(self.senders)} senders, {len(self.receivers)} receivers, {len(self.edges)} edges)")


def graph(model) -> Graph:
    """The circuit graph of a model (an nnpatch model or a torch module); see the module doc."""
    return Graph(model.module if isinstance(model, Model) else model)


def _lookup(index: dict[str, int], name: str, what: str, forms: str) -> int:
    if name in index:
        return index[name]
    close = difflib.get_close_matches(str(name), list(index), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise NNPatchValueError(f"unknown {what} node {name!r}{hint}; {what}s are named {forms}")


def _out_features(module: torch.nn.Module, side: str) -> int | None:
    w = weight_matrix(module)
    return None if w is None else w.shape[0 if side == "in" else 1]


def weight_matrix(module: torch.nn.Module) -> torch.Tensor | None:
    """A linear module's weight as `[in, out]` (torch Linear stores `[out, in]`, GPT-2's Conv1D
    `[in, out]`), or None when the module is not one of these."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.t()
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight
    return None
