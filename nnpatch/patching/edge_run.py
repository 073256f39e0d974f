"""One batched forward pass with the receivers of the circuit graph reading rewritten inputs.

Every circuit method is this one run with a different rewrite of each receiver's input `x`:

  * edges patched (`evaluate_circuit`, EAP's reference): x + sum over patched edges s->r of
    (source_s - current_s), where source is the sender's output in the corrupt run (or its mean)
    and current its output in this very run;
  * receivers set (`path_patching`): x replaced by a given target;
  * zero leaves (EAP): x + leaf, whose gradient is the metric's gradient with respect to the
    receiver's input (for attention receivers the leaf sits on the projection output and the
    gradient is carried back to the residual input afterwards, which costs no extra forward work).

A head's residual output is `z_h @ W_O[h]` (z: the head's slice of the output projection's input).
An attention receiver (head h's query, key or value) gets its own input by adding
(norm(x + delta) - norm(x)) @ W[:, columns of h] to its columns of the projection output, so each
head of a layer can read a different residual stream although the model normalises it once.
The norm is called through `.forward` so that it bypasses the hooks on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.hooks import hooks, resolve
from ..errors import NNPatchTypeError
from .graph import Graph, weight_matrix
from .runner import _skipping
from .sites import Site


@dataclass
class Outputs:
    """What one run's senders wrote and its receivers read (all `[b, pos, ...]`)."""

    input: torch.Tensor | None = None  # [b, pos, d] the block-0 input
    z: list = field(default_factory=list)  # per layer [b, pos, heads * head_dim]
    mlp: list = field(default_factory=list)  # per layer [b, pos, d]
    attn_in: list = field(default_factory=list)  # per layer [b, pos, d], attention's residual input
    mlp_in: list = field(default_factory=list)  # per layer [b, pos, d]
    final_in: torch.Tensor | None = None  # [b, pos, d]
    resid: list = field(default_factory=list)  # per layer [b, pos, d], the block's input
    block_out_len: int = 0  # how blocks return: 0 a tensor, k a tuple of k elements

    def map(self, fn) -> "Outputs":
        return Outputs(fn(self.input), [fn(t) for t in self.z], [fn(t) for t in self.mlp],
                       [fn(t) for t in self.attn_in], [fn(t) for t in self.mlp_in], fn(self.final_in))


class EdgeRun:
    """The hooks of one rewritten run. Build once per model; `run` any number of times."""

    def __init__(self, graph: Graph, module: torch.nn.Module):
        self.graph, self.module = graph, module
        g = graph
        self.w_o = []  # per layer [heads, head_dim, d]
        for site in g.head_sites:
            w = weight_matrix(resolve(module, site.path))
            if w is None:
                raise NNPatchTypeError(f"{site.path} is a {type(resolve(module, site.path)).__name__}, not a linear "
                                       "layer, so its input cannot be split into heads' outputs; the circuit graph "
                                       "needs head_out at the input of attention's output projection")
            self.w_o.append(w.reshape(g.n_heads, g.head_dim, -1))
        self.proj_w = [[weight_matrix(resolve(module, p.path)) for p in layer.projections] for layer in g.layers]
        self.norms = [resolve(module, layer.attn_norm) for layer in g.layers]
        self.attn_first = [layer.projections[0].receivers[0] if layer.projections else 0 for layer in g.layers]
        self.n_attn = [layer.mlp - first for layer, first in zip(g.layers, self.attn_first)]

    def head_outputs(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Each head's residual output `[heads, b, pos, d]` from its z `[b, pos, heads * head_dim]`."""
        g = self.graph
        zh = z.reshape(*z.shape[:-1], g.n_heads, g.head_dim)
        return torch.einsum("bphe,hed->hbpd", zh, self.w_o[layer].to(z.dtype))

    def sender_outputs(self, out: Outputs) -> torch.Tensor:
        """Every sender's residual output `[senders, b, pos, d]`, in graph order."""
        parts = [out.input[None]]
        for layer in range(self.graph.n_layers):
            parts += [self.head_outputs(layer, out.z[layer]), out.mlp[layer][None]]
        return torch.cat(parts)

    def sender_deltas(self, a: Outputs, b: Outputs) -> torch.Tensor:
        """Every sender's output in run `a` minus run `b` `[senders, b, pos, d]` (outputs are linear
        in what the hooks keep, so the difference is taken first)."""
        return self.sender_outputs(Outputs(a.input - b.input, [x - y for x, y in zip(a.z, b.z)],
                                           [x - y for x, y in zip(a.mlp, b.mlp)]))

    def receiver_grads(self, leaves: "Leaves", grads: list) -> torch.Tensor:
        """The metric's gradient with respect to every receiver's input `[receivers, b, pos, d]`,
        from the gradients of a run's leaves (in `leaves.tensors` order).

        An attention receiver's leaf sits on its projection's output y; its gradient g goes back to
        the residual input through the receiver's columns and the norm: J_norm(x)^T (W_cols g_cols)."""
        g = self.graph
        out = None
        for (kind, key, x), grad, leaf in zip(leaves.keys, grads, leaves.tensors):
            if out is None:
                shape = leaf.shape[1:] if kind == "resid" else x.shape
                out = torch.zeros(len(g.receivers), *shape, dtype=leaf.dtype, device=leaf.device)
            if grad is None:
                continue
            if kind == "resid":
                out[key:key + len(grad)] = grad
                continue
            layer, i = key
            proj = g.layers[layer].projections[i]
            columns = torch.stack(proj.columns).to(grad.device)  # [k, head_dim]
            w = self.proj_w[layer][i][:, columns].permute(1, 0, 2)  # [k, d, head_dim]
            gk = grad[..., columns].to(w.dtype).flatten(0, -3).transpose(0, 1)  # [k, b * pos, head_dim]
            u = torch.bmm(gk, w.transpose(1, 2)).reshape(len(columns), *x.shape)  # [k, b, pos, d]
            with torch.enable_grad():
                xr = x.detach()[None].expand(len(u), *x.shape).clone().requires_grad_(True)
                normed = self.norms[layer].forward(xr)
                back = torch.autograd.grad(normed, xr, u.to(normed.dtype))[0]
            out[torch.tensor(proj.receivers, device=out.device)] = back.to(out.dtype)
        return out

    def run(self, forward, ids: torch.Tensor, *, source: Outputs | None = None,
            mask: torch.Tensor | None = None, targets: dict | None = None, leaves: bool = False,
            input_value: torch.Tensor | None = None, capture: bool = False,
            start: tuple[int, torch.Tensor, int] | None = None):
        """`forward(ids)` (the model's last-position logits) with receivers rewritten.

        `mask` `[receivers, senders]` or `[b, receivers, senders]` (1: the edge carries `source`'s
        value); `targets` {receiver: [b, pos, d]} sets receivers' inputs; `leaves` adds a zero leaf
        to every receiver; `input_value` replaces the input embedding. `start` (layer, its block
        input [b, pos, d], the blocks' `Outputs.block_out_len`) runs from that block on, earlier
        blocks passing their input through (their hooks do not fire: only for runs whose rewrites
        all lie in later layers). Returns (logits, Outputs captured when `capture`, and with
        `leaves` the `Leaves` to differentiate)."""
        state = _State(self, source, mask, targets or {}, leaves, capture)
        g = self.graph
        specs = [(g.input_site.path, "input", state.input_hook(input_value))]
        for layer, lr in enumerate(g.layers):
            specs.append((g.head_sites[layer].path, g.head_sites[layer].kind, state.keep(g.head_sites[layer], "z", layer)))
            specs.append((g.mlp_sites[layer].path, g.mlp_sites[layer].kind, state.keep(g.mlp_sites[layer], "mlp", layer)))
            specs.append((lr.attn_norm, "input", state.attn_norm_hook(layer)))
            for i, proj in enumerate(lr.projections):
                specs.append((proj.path, "output", state.projection_hook(layer, i)))
            specs.append((lr.mlp_norm, "input", state.norm_hook(layer, lr.mlp, "mlp_in")))
        specs.append((g.final_norm, "input", state.norm_hook(g.n_layers, len(g.receivers) - 1, "final_in")))
        if capture:
            specs += [(site.path, site.kind, state.keep(site, "resid", layer)) for layer, site in enumerate(g.resid_sites)]
            specs.append((f"{g.blocks}.0", "output", state.note_block_output))
        skip, out_len = 0, 0
        if start is not None and start[0] > 0:
            skip, resid, out_len = start
            site = g.resid_sites[skip]
            specs.append((site.path, site.kind, lambda m, args, kwargs: site.with_input(args, kwargs, resid)))
        with hooks(self.module, specs), _skipping(self.module, g.blocks, skip, out_len):
            logits = forward(ids)
        return logits, state.captured, state.leaves


@dataclass
class Leaves:
    """A run's zero leaves: the tensors to differentiate, and what each stands for: ("resid",
    first receiver, None) for a receiver input, ("proj", (layer, i), x) for a projection output."""

    tensors: list = field(default_factory=list)
    keys: list = field(default_factory=list)


class _State:
    """The values of one run as its hooks see them."""

    def __init__(self, run: EdgeRun, source, mask, targets, leaves, capture):
        self.r, self.g = run, run.graph
        self.source, self.mask, self.targets, self.want_leaves = source, mask, targets, leaves
        self.capture = capture
        self.captured = Outputs() if capture else None
        self.cur = Outputs(z=[None] * self.g.n_layers, mlp=[None] * self.g.n_layers, resid=[None] * self.g.n_layers)
        self.diffs: list[torch.Tensor] = []  # chunks of (source - current) per sender, graph order
        self.n_diffs = 0
        self.attn_delta: dict[int, torch.Tensor] = {}
        self.attn_x: dict[int, torch.Tensor] = {}
        self.leaves = Leaves() if leaves else None

    # -- senders ---------------------------------------------------------------------------------
    def input_hook(self, value):
        site = self.g.input_site

        def hook(module, args, kwargs):
            x = site.read(args, kwargs)
            if value is not None:
                x = value.to(x.dtype)
            self.cur.input = x
            if self.capture:
                self.captured.input = x.detach()
            if value is not None:
                return site.with_input(args, kwargs, x)
        return hook

    def keep(self, site: Site, what: str, layer: int):
        def hook(module, args, kwargs, output=None):
            x = site.read(args, kwargs, output)
            getattr(self.cur, what)[layer] = x
            if self.capture:
                getattr(self.captured, what).append(x.detach())
        if site.kind == "input":
            return lambda module, args, kwargs: hook(module, args, kwargs)
        return hook

    def note_block_output(self, module, args, kwargs, output):
        self.captured.block_out_len = len(output) if isinstance(output, tuple) else 0

    def _sender_diffs(self, upto: int) -> torch.Tensor:
        """(source - current) residual outputs of senders 0..upto-1 `[upto, b, pos, d]`."""
        while self.n_diffs < upto:
            s = self.n_diffs
            if s == 0:
                chunk = (self.source.input - self.cur.input)[None]
            else:
                layer, k = divmod(s - 1, self.g.n_heads + 1)
                if k < self.g.n_heads:
                    chunk = self.r.head_outputs(layer, self.source.z[layer] - self.cur.z[layer])
                else:
                    chunk = (self.source.mlp[layer] - self.cur.mlp[layer])[None]
            self.diffs.append(chunk)
            self.n_diffs += len(chunk)
        diffs = torch.cat(self.diffs) if len(self.diffs) > 1 else self.diffs[0]
        return diffs[:upto]

    # -- receivers -------------------------------------------------------------------------------
    def delta(self, receivers: list[int], x: torch.Tensor, leaf: bool = True) -> torch.Tensor | None:
        """The rewrite of receivers' shared input `x` `[b, pos, d]`: `[k, b, pos, d]`, or None.
        With leaves wanted (and `leaf`), a zero leaf is added."""
        out = None
        if self.mask is not None:
            m = self.mask[..., receivers, :]  # [(b,) k, senders]
            live = m.reshape(-1, m.shape[-1]).any(0).nonzero()
            if len(live):
                upto = int(live.max()) + 1
                d = self._sender_diffs(upto)  # [upto, b, pos, d]
                m = m[..., :upto].to(d.dtype)
                out = torch.einsum("brs,sbpd->rbpd" if m.dim() == 3 else "rs,sbpd->rbpd", m, d)
        for i, r in enumerate(receivers):
            if r in self.targets:
                if out is None:
                    out = torch.zeros(len(receivers), *x.shape, dtype=x.dtype, device=x.device)
                out[i] = out[i] + (self.targets[r].to(x.dtype) - x)
        if self.want_leaves and leaf:
            zero = torch.zeros(len(receivers), *x.shape, dtype=x.dtype, device=x.device, requires_grad=True)
            self.leaves.tensors.append(zero)
            self.leaves.keys.append(("resid", receivers[0], None))
            out = zero if out is None else out + zero
        return out

    def attn_norm_hook(self, layer: int):
        site = Site(self.g.layers[layer].attn_norm, "input")
        first, n = self.r.attn_first[layer], self.r.n_attn[layer]

        def hook(module, args, kwargs):
            x = site.read(args, kwargs)
            if self.capture:
                self.captured.attn_in.append(x.detach())
            self.attn_x[layer] = x
            # Attention receivers' leaves sit on the projection outputs (see EdgeRun.receiver_grads).
            d = self.delta(list(range(first, first + n)), x, leaf=False)
            if d is not None:
                self.attn_delta[layer] = d
        return hook

    def projection_hook(self, layer: int, i: int):
        proj = self.g.layers[layer].projections[i]
        w = self.r.proj_w[layer][i]  # [d, out]
        first = self.r.attn_first[layer]
        local = torch.tensor(proj.receivers) - first
        columns = torch.stack(proj.columns)  # [k, head_dim]
        norm = self.r.norms[layer]

        def hook(module, args, kwargs, y):
            if self.want_leaves:
                zero = torch.zeros_like(y, requires_grad=True)
                self.leaves.tensors.append(zero)
                self.leaves.keys.append(("proj", (layer, i), self.attn_x[layer].detach()))
                y = y + zero
            if layer not in self.attn_delta:
                return y if self.want_leaves else None
            x = self.attn_x[layer]
            d = self.attn_delta[layer][local.to(x.device)]  # [k, b, pos, d]
            changed = norm.forward(x[None] + d) - norm.forward(x)[None]  # [k, b, pos, d]
            wk = w[:, columns.to(w.device)].permute(1, 0, 2)  # [k, d, head_dim]
            add = torch.einsum("kbpd,kde->bpke", changed.to(wk.dtype), wk)
            cols = columns.reshape(-1).to(y.device)
            y = y.clone()
            y[..., cols] = y[..., cols] + add.reshape(*add.shape[:2], -1).to(y.dtype)
            return y
        return hook

    def norm_hook(self, layer: int, receiver: int, what: str):
        site = Site("", "input")

        def hook(module, args, kwargs):
            x = site.read(args, kwargs)
            if self.capture:
                val = x.detach()
                if what == "final_in":
                    self.captured.final_in = val
                else:
                    self.captured.mlp_in.append(val)
            d = self.delta([receiver], x)
            if d is None:
                return None
            return site.with_input(args, kwargs, x + d[0])
        return hook
