"""The logic of the circuit panel, with no widget library in sight.

`CircuitPanel` is a thin view over `CircuitController`, which calls nnpatch's public API only:
`edge_attribution` (EAP or EAP-IG, for one pair or the whole task), `Circuit.threshold` and
`evaluate_circuit` (the circuit and its faithfulness as the threshold moves), `path_patching`
(one edge patched alone) and `circuit_plot.graph`. `code()` is that same sequence as Python.

Examples:
    >>> import nnpatch
    >>> from nnpatch.jupyter.circuit_controller import CircuitController
    >>> ctl = CircuitController(nnpatch.models.load("ioi"), nnpatch.tasks.ioi(4, template=0))
    >>> view = ctl.run(method="eap")
    >>> view.n_edges == len(ctl.circuit) and 0 < view.fraction
    True
    >>> ctl.select_edge(ctl.circuit.edges_table()[0]["edge"]).patched_alone < 0
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from ..errors import NNPatchValueError
from ..patching.edge_attribution import edge_attribution
from ..patching.faithfulness import evaluate_circuit
from ..patching.pairs import pair_dicts
from ..patching.path_patching import path_patching
from . import circuit_plot

DEFAULT_EDGES = 30  # the first threshold keeps this many edges


@dataclass(frozen=True)
class CircuitView:
    """What the panel shows after a run or a threshold change."""

    threshold: float
    max_score: float
    n_edges: int
    n_nodes: int
    score: float  # the circuit's metric
    fraction: float  # of the clean metric
    normalized: float  # corrupt 0, clean 1
    message: str


@dataclass(frozen=True)
class EdgeView:
    """One edge: its attribution score and the metric's change when it alone is patched."""

    edge: str
    score: float
    patched_alone: float


class CircuitController:
    def __init__(self, model, pairs, *, metric: str = "logit_diff"):
        self.model, self.metric = model, metric
        self.pairs = pair_dicts(pairs)
        if not self.pairs:
            raise NNPatchValueError("the circuit panel needs prompt pairs, e.g. nnpatch.tasks.ioi(8, template=0)")
        self.method, self.steps, self.scope, self.pair_index = "eap", 5, "task", 0
        self.scores = self.circuit = self.faithfulness = None
        self.threshold = 0.0
        self.selected: EdgeView | None = None

    # -- inputs -----------------------------------------------------------------------------------
    def chosen_pairs(self) -> SimpleNamespace:
        """The pairs a run uses: all of them ("task") or the selected one ("pair")."""
        rows = self.pairs if self.scope == "task" else [self.pairs[self.pair_index]]
        field = lambda k: [r[k] for r in rows] if all(r[k] for r in rows) else None  # noqa: E731
        return SimpleNamespace(clean=field("clean"), corrupt=field("corrupt"), answer=field("answer"),
                               wrong=field("wrong"))

    # -- actions ----------------------------------------------------------------------------------
    def run(self, *, method: str | None = None, steps: int | None = None, scope: str | None = None,
            pair_index: int | None = None) -> CircuitView:
        """Score every edge, then show the circuit of the `DEFAULT_EDGES` best edges."""
        self.method = method or self.method
        self.steps = int(steps or self.steps)
        self.scope = scope or self.scope
        if scope not in (None, "task", "pair"):
            raise NNPatchValueError(f"scope {scope!r}: choose 'task' (all pairs) or 'pair' (the selected one)")
        if pair_index is not None:
            if not 0 <= pair_index < len(self.pairs):
                raise NNPatchValueError(f"pair {pair_index} does not exist; there are {len(self.pairs)} pairs")
            self.pair_index = pair_index
        self.scores = edge_attribution(self.model, self.chosen_pairs(), method=self.method, steps=self.steps,
                                       metric=self.metric)
        self.selected = None
        ranked = self.scores.scores.abs().sort(descending=True).values
        return self.set_threshold(float(ranked[min(DEFAULT_EDGES, len(ranked)) - 1]))

    def set_threshold(self, t: float) -> CircuitView:
        """The circuit of edges with |score| >= t and its faithfulness; a threshold that keeps no
        edge leaves the last circuit in place and says so."""
        if self.scores is None:
            raise NNPatchValueError("run edge attribution first (run())")
        top = float(self.scores.scores.abs().max())
        try:
            circuit = self.scores.threshold(t)
        except NNPatchValueError as e:
            return self._view(str(e), top)
        self.threshold, self.circuit = float(t), circuit
        self.faithfulness = evaluate_circuit(self.model, self.chosen_pairs(), circuit, metric=self.metric)
        return self._view("", top)

    def select_edge(self, edge: str) -> EdgeView:
        """An edge's score, and the change of the metric when only that edge is patched."""
        if self.scores is None:
            raise NNPatchValueError("run edge attribution first (run())")
        if edge not in self.scores.edges:
            raise NNPatchValueError(f"edge {edge!r} is not in the graph; edges look like 'a0.h3->m0'")
        sender, receiver = edge.split("->")
        result = path_patching(self.model, self.chosen_pairs(), senders=[sender], receivers=[receiver],
                               metric=self.metric)
        score = float(self.scores.scores[self.scores.edges.index(edge)])
        self.selected = EdgeView(edge, score, float(result.change[0]))
        return self.selected

    def figure(self):
        return circuit_plot.graph(self.circuit) if self.circuit is not None else None

    def _view(self, message: str, top: float) -> CircuitView:
        f = self.faithfulness
        return CircuitView(self.threshold, top, len(self.circuit), len(self.circuit.nodes), f.score, f.fraction,
                           f.normalized, message)

    # -- show code --------------------------------------------------------------------------------
    def code(self) -> str:
        """The panel's current state as Python using nnpatch's public API."""
        pairs = self.chosen_pairs()
        lines = ["import nnpatch", "from nnpatch.jupyter import circuit_plot", "",
                 "model = ...  # the model given to the panel"]
        lines.append("pairs = dict(" + ", ".join(f"{k}={getattr(pairs, k)!r}" for k in ("clean", "corrupt", "answer", "wrong")) + ")")
        steps = f", steps={self.steps}" if self.method == "eap-ig" else ""
        lines.append(f"scores = nnpatch.edge_attribution(model, **pairs, method={self.method!r}{steps}, metric={self.metric!r})")
        if self.circuit is not None:
            lines.append(f"circuit = scores.threshold({self.threshold!r})")
            lines.append(f"faithfulness = nnpatch.evaluate_circuit(model, **pairs, circuit=circuit, metric={self.metric!r})")
            lines.append("circuit_plot.graph(circuit)")
        if self.selected is not None:
            sender, receiver = self.selected.edge.split("->")
            lines.append(f"alone = nnpatch.path_patching(model, **pairs, senders=[{sender!r}], receivers=[{receiver!r}], "
                         f"metric={self.metric!r}).change[0]")
        return "\n".join(lines)
