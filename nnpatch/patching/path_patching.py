"""Path patching (Wang et al. 2022, the IOI paper): the effect of one sender on the metric through
given receivers only.

For each sender s, the receivers' inputs are set to what they would be on the clean prompt if
every node but s were frozen at its clean value and s took its corrupt value: clean input +
(corrupt_s - clean_s) for each receiver s feeds (receivers s does not feed keep their clean input).
Everything downstream of the receivers then runs on. Senders run batched: one row per
(sender, pair), starting at the first receiver's block from the clean run's block input.

    >>> import nnpatch
    >>> model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(8, template=0)
    >>> result = nnpatch.path_patching(model, pairs, receivers=["logits"])
    >>> result.heads().shape  # layer x head: the change of the metric
    torch.Size([4, 4])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import NNPatchValueError
from .api import _one_at_a_time
from .circuit_job import CircuitJob
from .graph import Graph, QKV


@dataclass
class PathPatchingResult:
    """Per sender: the metric with the path sender -> receivers patched (`scores`, raw units)."""

    senders: list[str]
    receivers: list[str]
    scores: torch.Tensor  # [senders]
    clean_score: float
    corrupt_score: float
    metric: str
    n_layers: int
    n_heads: int

    @property
    def change(self) -> torch.Tensor:
        """scores minus the clean score: how much patching each path moves the metric."""
        return self.scores - self.clean_score

    @property
    def normalized(self) -> torch.Tensor:
        """(score - corrupt) / (clean - corrupt): 1 leaves the clean behaviour, 0 is fully corrupt."""
        return (self.scores - self.corrupt_score) / (self.clean_score - self.corrupt_score)

    def heads(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """`change` (or `values`, one per sender) of the head senders as `[layer, head]`, NaN elsewhere."""
        values = self.change if values is None else values
        grid = torch.full((self.n_layers, self.n_heads), float("nan"))
        for name, v in zip(self.senders, values.tolist()):
            if name.startswith("a"):
                layer, head = name[1:].split(".h")
                grid[int(layer), int(head)] = v
        return grid


@_one_at_a_time
def path_patching(model, clean, corrupt=None, *, senders: Sequence[str] | str | None = None,
                  receivers: Sequence[str] | str = "logits", answer=None, wrong=None,
                  metric: str | Callable = "logit_diff", batch_size: int | None = None) -> PathPatchingResult:
    """Patch the path from each sender to the receivers (see the module doc).

    `senders`: node names (`input`, `a{layer}.h{head}`, `m{layer}`), "heads" (default) or "all".
    `receivers`: receiver names: `a3.h1<q>`, a whole head `a3.h1` (its query, key and value
    inputs), `m3`, `logits`. Every sender must feed at least one receiver."""
    cj = CircuitJob(model, clean, corrupt, answer, wrong, metric)
    g = cj.graph
    recv = _receivers(g, receivers)
    send = _senders(g, senders, recv, explicit=senders not in (None, "heads", "all"))
    totals = torch.zeros(len(send))
    for runner, group, clean_out, corrupt_out in cj.groups():
        n = group.n
        with torch.no_grad():
            diff = cj.edges.sender_outputs(corrupt_out) - cj.edges.sender_outputs(clean_out)  # [S, n, pos, d]
        inputs = {r: _receiver_input(g, clean_out, r) for r in recv}  # [n, pos, d]
        d_model = clean_out.input.shape[-1]
        per = batch_size or max(1, (1 << 24) // max(1, n * group.clean.shape[1] * d_model * len(recv)))
        for start in range(0, len(send), per):
            chunk = send[start:start + per]
            k = len(chunk)
            targets = {}
            for r in recv:
                feeds = g.upstream[r, chunk].to(diff.device, diff.dtype)[:, None, None, None]  # [k, 1, 1, 1]
                targets[r] = (inputs[r][None] + feeds * diff[chunk]).reshape(k * n, *inputs[r].shape[1:])
            # Everything before the first receiver's layer is the clean run: start there.
            first = min(min(g.receiver_layer[r] for r in recv), g.n_layers - 1)  # logits: the last block
            skip = (first, clean_out.resid[first].repeat(k, 1, 1), clean_out.block_out_len)
            with torch.no_grad():
                logits, _, _ = cj.edges.run(cj.forward(runner), group.clean.repeat(k, 1), targets=targets, start=skip)
            stats = cj.row_stats(logits, group, list(range(n)) * k).float().cpu()
            totals[start:start + k] += stats.reshape(k, n).sum(1)
    return PathPatchingResult([g.senders[s] for s in send], [g.receivers[r] for r in recv],
                              totals / cj.job.n_pairs, cj.clean_score, cj.corrupt_score, cj.metric_name,
                              g.n_layers, g.n_heads)


def _receivers(g: Graph, names) -> list[int]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise NNPatchValueError("path patching needs at least one receiver, e.g. receivers='logits'")
    out = []
    for name in names:
        if name in g.receiver_index:
            out.append(g.receiver_index[name])
        elif name.startswith("a") and "<" not in name and f"{name}<q>" in g.receiver_index:
            layer, head = (int(x) for x in name[1:].split(".h"))
            kv = head * g.n_kv // g.n_heads
            out += [g.receiver_index[f"a{layer}.h{head}<q>"]] + [g.receiver_index[f"a{layer}.h{kv}<{w}>"]
                                                                  for w in QKV[1:]]
        else:
            out.append(g.receiver(name))  # raises, naming the valid forms
    return sorted(set(out))


def _senders(g: Graph, names, recv: list[int], explicit: bool) -> list[int]:
    if names in (None, "heads"):
        idx = [i for i, s in enumerate(g.senders) if s.startswith("a")]
    elif names == "all":
        idx = list(range(len(g.senders)))
    else:
        idx = [g.sender(n) for n in ([names] if isinstance(names, str) else names)]
    feeds = g.upstream[recv][:, idx].any(0)
    if explicit and not bool(feeds.all()):
        bad = [g.senders[i] for i, f in zip(idx, feeds.tolist()) if not f]
        raise NNPatchValueError(
            f"sender(s) {', '.join(bad)} do not feed any receiver ({', '.join(g.receivers[r] for r in recv)}): "
            "a sender must come before its receivers (an earlier layer, or a head before its own layer's MLP)")
    idx = [i for i, f in zip(idx, feeds.tolist()) if f]
    if not idx:
        raise NNPatchValueError(f"no sender feeds the receivers {', '.join(g.receivers[r] for r in recv)}; "
                                "pick receivers in a later layer")
    return idx


def _receiver_input(g: Graph, out, r: int) -> torch.Tensor:
    """The residual input `[n, pos, d]` receiver `r` reads in a captured run."""
    layer = g.receiver_layer[r]
    if layer == g.n_layers:
        return out.final_in
    if r == g.layers[layer].mlp:
        return out.mlp_in[layer]
    return out.attn_in[layer]
