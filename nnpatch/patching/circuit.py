"""`Circuit`: scored edges of a model's graph and the subset kept, with selection, tables and files.

`edge_attribution` returns a `Circuit` holding every edge with its score and all edges kept;
`top(n)`, `threshold(t)` and `greedy(n)` return smaller circuits; `evaluate_circuit` measures how
much of the model's behaviour a circuit keeps. A score is the estimated change of the metric when
that edge alone carries its corrupt value (negative: the edge supports the clean behaviour).

    >>> import nnpatch
    >>> model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(8, template=0)
    >>> scores = nnpatch.edge_attribution(model, pairs, method="eap")
    >>> small = scores.top(40)
    >>> len(small), small.edges_table()[0]["sender"] in small.graph_nodes
    (40, True)

Files are safetensors (scores and the kept mask) plus a JSON file beside them (graph, edge names,
method, metric); nothing is pickled.
"""
from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass

import torch

from ..errors import NNPatchValueError

_NODE = re.compile(r"^a(?P<layer>\d+)\.h(?P<head>\d+)$|^m(?P<mlp>\d+)$")


@dataclass(frozen=True)
class GraphKey:
    """What identifies a model's graph: a circuit only applies to the graph it was found on."""

    architecture: str
    n_layers: int
    n_heads: int
    n_kv: int
    n_edges: int
    model: str

    @classmethod
    def of(cls, graph) -> "GraphKey":
        return cls(graph.architecture, graph.n_layers, graph.n_heads, graph.n_kv, len(graph.edges),
                   pathlib.PurePath(str(graph.model_name)).name)


class Circuit:
    """Edges of a model's graph with scores, and which of them the circuit keeps."""

    def __init__(self, key: GraphKey, edges: list[str], scores: torch.Tensor, kept: torch.Tensor,
                 *, method: str = "", metric: str = "", clean_score: float = float("nan"),
                 corrupt_score: float = float("nan")):
        self.key, self.edges = key, list(edges)
        self.scores = scores.float().cpu()  # [edges]
        self.kept = kept.bool().cpu()  # [edges]
        self.method, self.metric = method, metric
        self.clean_score, self.corrupt_score = clean_score, corrupt_score

    def __len__(self) -> int:
        return int(self.kept.sum())

    def __repr__(self) -> str:
        return (f"Circuit({len(self)} of {len(self.edges)} edges, {len(self.nodes)} nodes; "
                f"{self.key.architecture} {self.key.model!r}, {self.method or 'scores'}, metric {self.metric})")

    def _with(self, kept: torch.Tensor, what: str) -> "Circuit":
        if not bool(kept.any()):
            best = float(self.scores.abs().max()) if len(self.scores) else 0.0
            raise NNPatchValueError(f"{what} keeps no edge (the largest |score| is {best:.4g}); lower the "
                                    "threshold or ask for more edges")
        return Circuit(self.key, self.edges, self.scores, kept, method=self.method, metric=self.metric,
                       clean_score=self.clean_score, corrupt_score=self.corrupt_score)

    # -- selection ---------------------------------------------------------------------------------
    def top(self, n: int) -> "Circuit":
        """The `n` edges with the largest |score|."""
        if int(n) < 1:
            raise NNPatchValueError(f"top({n}) keeps no edge; give n >= 1")
        kept = torch.zeros_like(self.kept)
        kept[self.scores.abs().argsort(descending=True, stable=True)[:int(n)]] = True
        return self._with(kept, f"top({n})")

    def threshold(self, t: float) -> "Circuit":
        """The edges with |score| >= t."""
        return self._with(self.scores.abs() >= float(t), f"threshold({t})")

    def greedy(self, n: int) -> "Circuit":
        """`n` edges grown from the logits: each step adds the largest-|score| edge whose receiver's
        node is already in the circuit, so every kept edge has a path to the logits."""
        if int(n) < 1:
            raise NNPatchValueError(f"greedy({n}) keeps no edge; give n >= 1")
        order = self.scores.abs().argsort(descending=True, stable=True).tolist()
        senders = [e.split("->")[0] for e in self.edges]
        receiver_nodes = [self.receiver_nodes(e.split("->")[1]) for e in self.edges]
        reached, kept = {"logits"}, torch.zeros_like(self.kept)
        count = 0
        while count < int(n):
            pick = next((i for i in order if not kept[i] and not reached.isdisjoint(receiver_nodes[i])), None)
            if pick is None:
                break
            kept[pick] = True
            reached.add(senders[pick])
            count += 1
        return self._with(kept, f"greedy({n})")

    # -- tables ------------------------------------------------------------------------------------
    @property
    def graph_nodes(self) -> list[str]:
        """Every node of the graph, senders in forward order then `logits`."""
        seen = dict.fromkeys(e.split("->")[0] for e in self.edges)
        return list(seen) + ["logits"]

    @property
    def nodes(self) -> list[str]:
        """The nodes the kept edges touch."""
        touched = set()
        for e in self.kept_edges:
            s, r = e.split("->")
            touched.update([s, *self.receiver_nodes(r)])
        return [n for n in self.graph_nodes if n in touched]

    @property
    def kept_edges(self) -> list[str]:
        return [e for e, k in zip(self.edges, self.kept.tolist()) if k]

    def edges_table(self, all_edges: bool = False) -> list[dict]:
        """One dict per kept edge (every edge with `all_edges`), largest |score| first: sender,
        receiver, score, kept."""
        rows = []
        for e, s, k in zip(self.edges, self.scores.tolist(), self.kept.tolist()):
            if k or all_edges:
                sender, receiver = e.split("->")
                rows.append({"edge": e, "sender": sender, "receiver": receiver, "score": s, "kept": k})
        return sorted(rows, key=lambda r: -abs(r["score"]))

    def nodes_table(self) -> list[dict]:
        """One dict per node of the circuit: node, layer, head (None for MLPs, input, logits), and
        the summed |score| of its kept edges in and out."""
        weight: dict[str, float] = {}
        for row in self.edges_table():
            for node in (row["sender"], *self.receiver_nodes(row["receiver"])):
                weight[node] = weight.get(node, 0.0) + abs(row["score"])
        out = []
        for node in self.nodes:
            layer, head = node_position(node, self.key.n_layers)
            out.append({"node": node, "layer": layer, "head": head, "weight": weight.get(node, 0.0)})
        return out

    # -- files -------------------------------------------------------------------------------------
    def save(self, path) -> pathlib.Path:
        """Write `path` (.safetensors: scores, kept) and `path` with suffix .json (the rest)."""
        from safetensors.torch import save_file
        path = pathlib.Path(path).with_suffix(".safetensors")
        save_file({"scores": self.scores.contiguous(), "kept": self.kept.to(torch.uint8)}, str(path))
        meta = {"format": "nnpatch.circuit/1", "graph": self.key.__dict__, "edges": self.edges,
                "method": self.method, "metric": self.metric,
                "clean_score": self.clean_score, "corrupt_score": self.corrupt_score}
        path.with_suffix(".json").write_text(json.dumps(meta))
        return path

    @classmethod
    def load(cls, path) -> "Circuit":
        from safetensors.torch import load_file
        path = pathlib.Path(path).with_suffix(".safetensors")
        meta_path = path.with_suffix(".json")
        if not meta_path.exists():
            raise NNPatchValueError(f"{path} has no {meta_path.name} beside it; a circuit is saved as both files")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "nnpatch.circuit/1":
            raise NNPatchValueError(f"{meta_path} is not an nnpatch circuit file (format {meta.get('format')!r})")
        tensors = load_file(str(path))
        if len(tensors["scores"]) != len(meta["edges"]):
            raise NNPatchValueError(f"{path} holds {len(tensors['scores'])} scores for {len(meta['edges'])} edges")
        return cls(GraphKey(**meta["graph"]), meta["edges"], tensors["scores"], tensors["kept"].bool(),
                   method=meta["method"], metric=meta["metric"], clean_score=meta["clean_score"],
                   corrupt_score=meta["corrupt_score"])

    def receiver_nodes(self, receiver: str) -> list[str]:
        """The nodes reading through a receiver: 'a3.h1<q>' -> ['a3.h1']; with grouped key/value
        heads, key/value head g's receiver feeds every query head of its group."""
        node, _, which = receiver.partition("<")
        if not which or which[0] == "q" or self.key.n_kv == self.key.n_heads:
            return [node]
        layer, group = (int(x) for x in node[1:].split(".h"))
        size = self.key.n_heads // self.key.n_kv
        return [f"a{layer}.h{h}" for h in range(group * size, (group + 1) * size)]

    def check_graph(self, graph) -> None:
        """Raise unless this circuit was found on a model with `graph`."""
        key = GraphKey.of(graph)
        if key != self.key:
            diff = [f"{f}: circuit {getattr(self.key, f)!r}, model {getattr(key, f)!r}"
                    for f in self.key.__dataclass_fields__ if getattr(self.key, f) != getattr(key, f)]
            raise NNPatchValueError("this circuit comes from another model (" + "; ".join(diff) + "); find "
                                    "it again on this model with nnpatch.edge_attribution")




def node_position(node: str, n_layers: int) -> tuple[int, int | None]:
    """(layer, head) of a node for drawing: input at layer -1, logits at `n_layers`."""
    if node == "input":
        return -1, None
    if node == "logits":
        return n_layers, None
    m = _NODE.match(node)
    if m is None:
        raise NNPatchValueError(f"unknown node {node!r}")
    if m["mlp"] is not None:
        return int(m["mlp"]), None
    return int(m["layer"]), int(m["head"])
