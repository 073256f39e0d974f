"""The batched runner: reference runs, chunked patched runs and gradient runs for one group of
prompt pairs, and the hooks they use.

How a sweep avoids the work a loop does:
  * many patched runs share one forward pass (rows of a batch, chunked to a memory budget);
  * a run patched at layer L starts at block L from the unpatched run's cached residual stream
    (earlier blocks are swapped for a pass-through while it runs);
  * in a causal decoder, a run patched at position p starts at position p, with the unpatched
    run's keys and values of the earlier positions as its key/value cache;
  * logits are computed only at the last position, and for a logit difference only for the two
    tokens it compares.
Every hook is removed and every swapped block restored in a `finally`, so an error or Ctrl-C
leaves the model as it was.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from ..engine.devices import embedding_path
from ..engine.hooks import hooks, resolve
from ..errors import NNPatchError, NNPatchTypeError
from .job import Group, Job, Row
from .sites import Site


class Runner:
    def __init__(self, job: Job, group: Group):
        self.job, self.group = job, group
        self.seq = group.clean.shape[1]  # this group's token length
        table = job.table
        self.fast = table.base is not None  # can run the blocks and the unembedding separately
        self.base = resolve(job.module, table.base) if self.fast else None
        self.unembed = resolve(job.module, table.unembed) if self.fast else None
        config = getattr(job.module, "config", None)
        window = getattr(config, "sliding_window", None)
        # A sliding-window cache keeps only the last `window` keys, so it cannot be sliced by position.
        self.kv = table.kv_cache and not (window and self.seq >= window)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.block_out_len = 0  # 0: blocks return a tensor; k: a tuple of k elements
        self.cache_arg = _cache_argument(self.base) if self.kv else None
        self.embed = _embedding_path(job.module) if group.noise is not None else None

    # -- reference runs ---------------------------------------------------------------------------
    def reference_runs(self) -> None:
        """Run the source and the base prompts once, keeping what the patched runs reuse."""
        group, job = self.group, self.job
        layers = sorted(set(job.layers))
        values: dict[int, torch.Tensor] = {}
        specs = [(job.sites[layer].path, job.sites[layer].kind, _keeper(job.sites[layer], values, layer))
                 for layer in layers]
        specs += self.noise_specs(group.source_noise)
        with torch.no_grad(), hooks(job.module, specs):
            source_logits, _ = self._forward(group.source_ids, want_cache=False)
        self.source_values = values  # layer -> [n, pos, d]

        resid: dict[int, torch.Tensor] = {}
        base_values: dict[int, torch.Tensor] = {}
        block_site = [Site(f"{job.table.blocks}.{i}", "input", 0, None, i) for i in range(job.table.n_layers)]
        specs = [(s.path, "input", _keeper(s, resid, i)) for i, s in enumerate(block_site)]
        specs += [(job.sites[layer].path, job.sites[layer].kind, _keeper(job.sites[layer], base_values, layer))
                  for layer in layers]
        specs.append((f"{job.table.blocks}.0", "output", self._note_block_output))
        specs += self.noise_specs(group.base_noise)
        with torch.no_grad(), hooks(job.module, specs):
            base_logits, self.cache = self._forward(group.base_ids, want_cache=self.kv)
        self.base_resid = resid  # layer -> [n, pos, d], the input of each block in the base run
        self.base_logits = base_logits  # [n, vocab]
        # Where source and base agree exactly (in a causal model: every position before the first
        # token that differs), a patch changes nothing and its run can be skipped.
        self.same = {}
        for layer in layers:
            src, base = values[layer], base_values[layer]
            heads = job.sites[layer].heads
            if heads:
                src, base = src.reshape(*src.shape[:-1], heads, -1), base.reshape(*base.shape[:-1], heads, -1)
            self.same[layer] = (src == base).all(-1).cpu()  # [n, pos] or [n, pos, head]
        self.set_scores(source_logits, base_logits)

    def rows(self, cells) -> tuple[list[Row], list[Row]]:
        """This group's rows of the given cells ((index, Patch) pairs): those whose patches change
        nothing (scored from the base run) and the live ones."""
        idle, live = [], []
        for cell, patch in cells:
            for pair in range(self.group.n):
                row = Row(pair, (patch,), cell)
                (idle if self.unchanged(row) else live).append(row)
        return idle, live

    def unchanged(self, row: Row) -> bool:
        """Whether every patch of the row writes the value that is already there."""
        for p in row.patches:
            same = self.same[p.layer][row.pair]
            if p.pos is not None:
                same = same[p.pos]
            if p.head is not None:
                same = same[..., p.head]
            if not bool(same.all()):
                return False
        return True

    def set_scores(self, source_logits, base_logits) -> None:
        denoise = self.job.direction == "denoise"
        self.clean_logits = (source_logits if denoise else base_logits).detach()
        self.corrupt_logits = (base_logits if denoise else source_logits).detach()

    def _note_block_output(self, module, args, kwargs, output):
        self.block_out_len = len(output) if isinstance(output, tuple) else 0

    def _forward(self, ids, *, want_cache: bool):
        """Unpatched full run: last-position logits `[n, vocab]` and the key/value cache."""
        if not self.fast:
            return _last_logits(self.job.module, ids), None
        out = self.base(input_ids=ids, use_cache=True) if want_cache else self.base(input_ids=ids)
        hidden = _hidden(out)[:, -1]
        return self._unembed(hidden), (getattr(out, self.cache_arg) if want_cache else None)

    def _unembed(self, hidden: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the final hidden state `[rows, d]`: all `[rows, vocab]`, or only `columns`
        `[rows, k]` when the unembedding is a plain linear map."""
        if columns is not None and isinstance(self.unembed, torch.nn.Linear) \
                and self.unembed.weight.device.type != "meta":  # offloaded weights load in forward
            at = self.unembed.weight.device
            w = self.unembed.weight[columns.to(at)]  # [rows, k, d]
            logits = torch.einsum("rd,rkd->rk", hidden.to(at), w)
            if self.unembed.bias is not None:
                logits = logits + self.unembed.bias[columns.to(at)]
        else:
            logits = self.unembed(hidden)
            if columns is not None:
                logits = logits.gather(-1, columns.to(logits.device))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.to(self.job.device)  # scores are computed where the inputs are

    # -- chunking ---------------------------------------------------------------------------------
    def chunks(self, rows: list[Row], cap: int):
        """Rows in batches of at most `cap` that share as much of the skipped work as the cost
        model finds worth it."""
        key = (lambda r: (r.layer if self.fast else 0, r.pos if self.kv else 0))
        rows = sorted(rows, key=key)
        groups: list[list[Row]] = []
        for r in rows:
            if groups and key(groups[-1][0]) == key(r):
                groups[-1].append(r)
            else:
                groups.append([r])
        cost = self.cost

        chunk: list[Row] = []
        start = None
        for g in groups:
            while len(g) > cap:  # a group larger than the budget runs in pieces
                if chunk:
                    yield chunk
                    chunk = []
                yield g[:cap]
                g = g[cap:]
            gkey = key(g[0])
            if chunk:
                merged = (min(start[0], gkey[0]), min(start[1], gkey[1]))
                if (len(chunk) + len(g) <= cap
                        and cost(len(chunk) + len(g), merged) <= cost(len(chunk), start) + cost(len(g), gkey)):
                    chunk += g
                    start = merged
                    continue
                yield chunk
            chunk, start = list(g), gkey
        if chunk:
            yield chunk

    def cost(self, n_rows: int, start: tuple[int, int]) -> float:
        """The cost model: a batch of `n_rows` runs starting at (layer, position) costs its tokens
        times its layers, plus a fixed per-layer overhead (in tokens) for each forward call."""
        layer, pos = start
        return (n_rows * (self.seq - pos) + 16 + self._overhead_tokens()) * (self.job.table.n_layers - layer)

    def _overhead_tokens(self) -> float:
        """Per-layer Python overhead of a forward call, in units of one token's compute."""
        d = getattr(getattr(self.job.module, "config", None), "hidden_size", 512)
        return 3e7 / (24 * d * d)

    # -- a batch of patched runs --------------------------------------------------------------------
    def run(self, rows: list[Row], mode: str) -> torch.Tensor:
        """Patched runs of `rows` in one forward: per-row logit differences `[rows]` (mode "diff")
        or last-position logits `[rows, vocab]`."""
        job, group = self.job, self.group
        start_layer = min(r.layer for r in rows) if self.fast else 0
        start_pos = min(r.pos for r in rows) if self.kv else 0
        pairs = torch.tensor([r.pair for r in rows], device=job.device)
        ids = group.base_ids[pairs, start_pos:]  # [rows, pos - start_pos]
        specs = []
        if start_layer > 0:
            stored = self.base_resid[start_layer]
            resid = stored[pairs.to(stored.device), start_pos:]  # [rows, pos', d]
            block = Site(f"{job.table.blocks}.{start_layer}", "input")
            specs.append((block.path, "input", _replace(block, lambda x: resid.to(x.device))))
        specs += self.patch_specs(rows, pairs, start_pos)
        noise = group.base_noise
        specs += self.noise_specs(None if noise is None else noise[pairs.to(noise.device), start_pos:])
        last = job.table.n_layers - 1
        if self.kv and all(p.layer < last for r in rows for p in r.patches):
            # In the last block only the last position reaches the logits: its attention output
            # projection and MLP run on that position alone, and the residual adds broadcast.
            for name in ("head_out", "mlp_out"):
                if name in job.table:
                    trimmed = Site(job.table[name][last].path, "input")
                    specs.append((trimmed.path, "input", _replace(trimmed, lambda x: x[:, -1:])))
        cache = self._prefix_cache(pairs, start_pos) if start_pos > 0 else None
        with torch.no_grad(), hooks(job.module, specs), _skipping(self.job.module, job.table.blocks,
                                                                  start_layer, self.block_out_len):
            if not self.fast:
                return _last_logits(job.module, ids)
            out = self.base(input_ids=ids, use_cache=True, **{self.cache_arg: cache}) if cache is not None \
                else self.base(input_ids=ids)
            hidden = _hidden(out)[:, -1]  # [rows, d]
            if mode == "diff":
                cols = torch.stack([group.answer[pairs], group.wrong[pairs]], -1)  # [rows, 2]
                two = self._unembed(hidden, cols)
                return two[:, 0] - two[:, 1]
            return self._unembed(hidden)

    def patch_specs(self, rows: list[Row], pairs: torch.Tensor, start_pos: int = 0) -> list:
        """Hooks that write each row's patches into a batch of base runs (`pairs` [rows]: the
        pair of each batch row; the batch starts at position `start_pos`)."""
        specs = []
        for layer, patch in self._patches(rows, pairs, start_pos).items():
            site = self.job.sites[layer]
            if site.via is None:
                specs.append((site.path, site.kind, _patch_hook(site, patch)))
            else:  # written through an addend: the addend becomes wanted value minus the stream
                stream: dict[str, torch.Tensor] = {}
                specs.append((site.stream.path, site.stream.kind, _keeper(site.stream, stream, "x", detach=False)))
                specs.append((site.via.path, site.via.kind, _patch_hook(site.via, patch, stream)))
        return specs

    def noise_specs(self, noise: torch.Tensor | None) -> list:
        """A hook adding `noise` [rows, pos, d] to the input embeddings (none for None)."""
        if noise is None:
            return []
        return [(self.embed, "output", lambda module, args, kwargs, out: out + noise.to(out.device, out.dtype))]

    def _patches(self, rows, pairs, start_pos):
        """Per layer: which (row, position, head) of the batch takes which source value."""
        seq = self.seq
        by_layer: dict[int, list[tuple[int, int, int, int]]] = {}
        for i, r in enumerate(rows):
            for p in r.patches:
                positions = range(start_pos, seq) if p.pos is None else [p.pos]
                for pos in positions:
                    by_layer.setdefault(p.layer, []).append((i, pos - start_pos, pos, -1 if p.head is None else p.head))
        out = {}
        for layer, entries in by_layer.items():
            source = self.source_values[layer]  # on the device of the module it was read from
            t = torch.tensor(entries, device=source.device)
            rows_i, local, pos, head = t.unbind(-1)
            src_pairs = pairs.to(source.device)[rows_i]
            heads = self.job.sites[layer].heads
            if bool((head >= 0).all()):
                value = source.reshape(*source.shape[:-1], heads, -1)[src_pairs, pos, head]  # [k, head_dim]
                out[layer] = (rows_i, local, head, value, heads)
            else:
                out[layer] = (rows_i, local, None, source[src_pairs, pos], heads)  # [k, d]
        return out

    def _prefix_cache(self, pairs: torch.Tensor, length: int):
        """The base run's keys and values of positions before `length`, for the given pairs."""
        from transformers import DynamicCache
        cache = DynamicCache(config=self.job.module.config)
        for i, layer in enumerate(self.cache.layers):
            at = pairs.to(layer.keys.device)  # each layer's cache lives where that layer runs
            cache.update(layer.keys[at, :, :length], layer.values[at, :, :length], i)
        return cache

    # -- gradient runs (attribution patching) --------------------------------------------------------
    def capture_sites(self, ids: torch.Tensor, *, grad: bool) -> "Captured":
        """One full run keeping each swept layer's site value; with grad, the values carry a zero
        leaf whose gradient is the metric's gradient with respect to the site."""
        job = self.job
        values: list[torch.Tensor | None] = [None] * len(job.layers)
        deltas: list[torch.Tensor | None] = [None] * len(job.layers)
        specs = []
        for i, layer in enumerate(job.layers):
            site = job.sites[layer]
            if grad and site.via is not None:
                # Read the value where it is; differentiate where it is written, so that the
                # gradient flows into every branch that reads it.
                specs.append((site.path, site.kind, _grad_probe(site, values, None, i)))
                specs.append((site.via.path, site.via.kind, _grad_probe(site.via, [None] * len(values), deltas, i)))
            else:
                specs.append((site.path, site.kind, _grad_probe(site, values, deltas if grad else None, i)))
        with torch.enable_grad() if grad else torch.no_grad(), hooks(job.module, specs):
            logits, _ = self._forward(ids, want_cache=False)
        missing = [str(job.sites[layer]) for layer, v in zip(job.layers, values) if v is None]
        if missing:
            raise NNPatchError(f"the forward pass never reached {', '.join(missing)}; these sites "
                               "cannot be patched in this model")
        return Captured(values, [d for d in deltas if d is not None], logits)


@dataclass
class Captured:
    values: list[torch.Tensor]  # per swept layer: [n, pos, d]
    deltas: list[torch.Tensor]  # per swept layer: the zero leaf added to the site
    logits: torch.Tensor  # [n, vocab]


def _embedding_path(module: torch.nn.Module) -> str:
    """The module path of the model's input embedding (`get_input_embeddings()`)."""
    path = embedding_path(module)
    if path is None:
        raise NNPatchTypeError(f"{type(module).__name__} has no get_input_embeddings(); noise on the input "
                               "embeddings needs a Hugging Face model (or a module that defines it)")
    return path


def _cache_argument(base: torch.nn.Module) -> str:
    """The name under which a Hugging Face decoder takes and returns its key/value cache: `cache`
    in recent transformers, where `past_key_values` is deprecated; `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


# ------------------------------------------------------------------------------------------------
# Hooks and the layer skip
# ------------------------------------------------------------------------------------------------

def _keeper(site: Site, store: dict, key, detach: bool = True):
    """A hook that stores the site's value."""
    def keep(value):
        store[key] = value.detach() if detach else value
    if site.kind == "input":
        def hook(module, args, kwargs):
            keep(site.read(args, kwargs))
    else:
        def hook(module, args, kwargs, output):
            keep(site.read(args, kwargs, output))
    return hook


def _grad_probe(site: Site, values: list, deltas: list | None, i: int):
    """A hook that stores the site's value and, when `deltas` is given, adds a zero leaf to it:
    the leaf's gradient is the metric's gradient with respect to the site, whatever the model's
    parameters' requires_grad, and the graph to earlier layers stays intact."""
    def swap(value):
        values[i] = value.detach()
        if deltas is None:
            return value
        deltas[i] = torch.zeros_like(value, requires_grad=True)
        return value + deltas[i]
    return _replace(site, swap)


def _replace(site: Site, fn):
    """A forward hook (pre-hook for an input site) that replaces the site's value `x` by `fn(x)`."""
    if site.kind == "input":
        def hook(module, args, kwargs):
            return site.with_input(args, kwargs, fn(site.read(args, kwargs)))
    else:
        def hook(module, args, kwargs, output):
            return site.with_output(output, fn(site.read(args, kwargs, output)))
    return hook


def _patch_hook(site: Site, patch, stream: dict | None = None):
    """A hook that writes the patch's values into the site; with `stream` (holding the current
    value the site is added to), it writes the values minus the stream."""
    rows, local, head, value, heads = patch

    def apply(x: torch.Tensor) -> torch.Tensor:
        # The patch goes where the module written into runs (a device map may put the source
        # value's module and this one on different devices).
        x = x.clone()
        at_rows, at_local = rows.to(x.device), local.to(x.device)
        new = value.to(x.device, x.dtype)
        if stream is not None:
            new = new - stream["x"].to(x.device)[at_rows, at_local]
        if head is None:
            x[at_rows, at_local] = new
        else:
            x.view(*x.shape[:-1], heads, -1)[at_rows, at_local, head.to(x.device)] = new
        return x
    return _replace(site, apply)


class _Skip(torch.nn.Module):
    """Stands in for a block whose output a run overwrites anyway: returns its input unchanged."""

    def __init__(self, block: torch.nn.Module, out_len: int):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: parameters stay where they were
        self._out_len = out_len

    def forward(self, hidden_states, *args, **kwargs):
        if self._out_len:
            return (hidden_states,) + (None,) * (self._out_len - 1)
        return hidden_states

    def __getattr__(self, name):  # attributes the model's loop reads, e.g. attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@contextlib.contextmanager
def _skipping(root: torch.nn.Module, blocks_path: str, n: int, out_len: int):
    """Swap blocks 0..n-1 for pass-throughs for the duration of a with-block."""
    if n == 0:
        yield
        return
    blocks = resolve(root, blocks_path)
    saved = [blocks[i] for i in range(n)]
    try:
        for i in range(n):
            blocks[i] = _Skip(saved[i], out_len)
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


def _hidden(out) -> torch.Tensor:
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0] if isinstance(out, (tuple, list)) else out


def _last_logits(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits of a full forward of any language model."""
    out = module(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise NNPatchTypeError(f"{type(module).__name__} returned {type(out).__name__}, not logits "
                               "[batch, pos, vocab]; sweeps need a model with a language-model head")
    return logits[:, -1]
