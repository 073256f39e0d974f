"""Circuits: the graph, path patching, edge attribution (EAP, EAP-IG) and faithfulness, each against
plain-PyTorch references written here by hand.

The references never use nnpatch's graph code: they name the modules of GPT-2 and Llama
themselves, freeze nodes with hooks (path patching, the IOI paper's three steps) and differentiate
the metric with respect to a scalar `t` that moves one receiver's input along one sender's
corrupt-minus-clean output (EAP). Llama has grouped key/value heads (4 query heads, 2 key/value
heads), GPT-2 a fused query/key/value projection.
"""
import pytest
import torch
import torch.nn.functional as F

import nnpatch
from nnpatch.patching.circuit import Circuit
from test_sites import build as build_small


pytestmark = pytest.mark.usefixtures("one_thread")

CLEAN = [[3, 4, 5, 6, 7, 8], [9, 4, 10, 11, 7, 12], [9, 4, 10, 11, 7, 12]]  # two equal pairs on purpose
CORRUPT = [[3, 4, 13, 6, 7, 8], [9, 4, 14, 11, 15, 12], [9, 4, 14, 11, 15, 12]]
ANSWER, WRONG = [20, 21, 21], [22, 23, 23]
DH = 8  # head size of the test models (32 / 4); Gemma's is 16, not d / heads

ARCH = {
    "gpt2": dict(z="transformer.h.{i}.attn.c_proj", mlp="transformer.h.{i}.mlp", block0="transformer.h.0",
                 attn_norm="transformer.h.{i}.ln_1", mlp_norm="transformer.h.{i}.ln_2", final="transformer.ln_f",
                 q=("transformer.h.{i}.attn.c_attn", 0), k=("transformer.h.{i}.attn.c_attn", 32),
                 v=("transformer.h.{i}.attn.c_attn", 64)),
    "llama": dict(z="model.layers.{i}.self_attn.o_proj", mlp="model.layers.{i}.mlp", block0="model.layers.0",
                  attn_norm="model.layers.{i}.input_layernorm", mlp_norm="model.layers.{i}.post_attention_layernorm",
                  final="model.norm", q=("model.layers.{i}.self_attn.q_proj", 0),
                  k=("model.layers.{i}.self_attn.k_proj", 0), v=("model.layers.{i}.self_attn.v_proj", 0)),
}


def build(name):
    """A random-weight model of the family with weights 8x the initialisation's scale, so that
    single paths move the logit difference by 1e-3 to 1e-1 (instead of 1e-6)."""
    model = build_small(name)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8)
    return model


# -- hand-written reference machinery ---------------------------------------------------------------

def mod(model, path, i=0):
    return model.get_submodule(path.format(i=i))


def hooked(model, ids, pre=(), post=()):
    """Last-position logits of a plain forward with (module, hook) pre-hooks and forward hooks."""
    hs = [m.register_forward_pre_hook(f, with_kwargs=True) for m, f in pre]
    hs += [m.register_forward_hook(f) for m, f in post]
    try:
        return model(torch.tensor(ids)).logits[:, -1]
    finally:
        for h in reversed(hs):
            h.remove()


def first_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def with_first(args, kwargs, value):
    return ((value,) + args[1:], kwargs) if args else (args, {**kwargs, "hidden_states": value})


def logit_diff(logits):
    rows = torch.arange(len(logits))
    return (logits[rows, ANSWER] - logits[rows, WRONG]).mean()


def record(model, name, ids):
    """Each layer's z (output projection input) and MLP output, and block 0's input."""
    a, n = ARCH[name], model.config.num_hidden_layers
    z, mlp, emb = {}, {}, {}
    pre = [(mod(model, a["z"], i), lambda m, args, kw, i=i: z.__setitem__(i, args[0].detach())) for i in range(n)]
    pre.append((mod(model, a["block0"]), lambda m, args, kw: emb.__setitem__(0, first_input(args, kw).detach())))
    post = [(mod(model, a["mlp"], i), lambda m, i_, o, i=i: mlp.__setitem__(i, o.detach())) for i in range(n)]
    with torch.no_grad():
        hooked(model, ids, pre, post)
    return z, mlp, emb[0]


def sender_delta(model, name, sender, clean, corrupt):
    """A sender's corrupt-minus-clean residual output `[n, pos, d]`, by hand."""
    (zc, mc, ec), (zk, mk, ek) = clean, corrupt
    if sender == "input":
        return ek - ec
    if sender.startswith("m"):
        i = int(sender[1:])
        return mk[i] - mc[i]
    layer, h = (int(x) for x in sender[1:].split(".h"))
    proj = mod(model, ARCH[name]["z"], layer)
    w = proj.weight[h * DH:(h + 1) * DH] if name == "gpt2" else proj.weight[:, h * DH:(h + 1) * DH].t()
    return (zk[layer] - zc[layer])[..., h * DH:(h + 1) * DH] @ w


def norm(model, name, path, x):
    ln = mod(model, path)
    if name == "gpt2":
        return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ln.variance_epsilon) * ln.weight


def project(model, name, path, x):
    p = mod(model, path)
    return x @ p.weight + p.bias if name == "gpt2" else x @ p.weight.t()


def receiver_hooks(model, name, receiver, new_input):
    """Hooks giving `receiver` the residual input `new_input(x)` (x: its clean input)."""
    a = ARCH[name]
    if receiver == "logits" or receiver.startswith("m"):
        path = a["final"] if receiver == "logits" else a["mlp_norm"].format(i=int(receiver[1:]))
        return [(mod(model, path), lambda m, args, kw: with_first(args, kw, new_input(first_input(args, kw))))], []
    node, which = receiver[:-1].split("<")
    layer, h = (int(x) for x in node[1:].split(".h"))
    path, offset = a[which]
    cols = torch.arange(offset + h * DH, offset + (h + 1) * DH)
    seen = {}
    ln_path = a["attn_norm"].format(i=layer)

    def keep(m, args, kw):
        seen["x"] = first_input(args, kw)

    def rewrite(m, args, y):
        y = y.clone()
        y[..., cols] = project(model, name, path.format(i=layer), norm(model, name, ln_path, new_input(seen["x"])))[..., cols]
        return y
    return [(mod(model, ln_path), keep)], [(mod(model, path, layer), rewrite)]


def frozen_path_patching(model, name, sender, receivers):
    """The IOI paper's path patching, by hand: (1) record clean and corrupt values; (2) run clean
    with every head's z and every MLP frozen at clean, the sender's at corrupt, and record the
    receivers' inputs; (3) run clean with the receivers' inputs set to those."""
    a, n = ARCH[name], model.config.num_hidden_layers
    clean, corrupt = record(model, name, CLEAN), record(model, name, CORRUPT)
    s_layer = int(sender[1:].split(".")[0]) if sender != "input" else -1

    head = int(sender.split(".h")[1]) if sender.startswith("a") else None

    def freeze_z(i):
        def hook(m, args, kw):
            z = clean[0][i].clone()
            if head is not None and i == s_layer:
                z[..., head * DH:(head + 1) * DH] = corrupt[0][i][..., head * DH:(head + 1) * DH]
            return (z,) + args[1:], kw
        return hook

    def freeze_mlp(i):
        return lambda m, args, out: (corrupt if sender == f"m{i}" else clean)[1][i]
    pre = [(mod(model, a["z"], i), freeze_z(i)) for i in range(n)]
    post = [(mod(model, a["mlp"], i), freeze_mlp(i)) for i in range(n)]
    recorded = {}
    for r in receivers:
        rp, rq = receiver_hooks(model, name, r, lambda x, r=r: recorded.__setitem__(r, x.detach()) or x)
        pre, post = pre + rp, post + rq
    with torch.no_grad():
        hooked(model, CLEAN, pre, post)
    pre, post = [], []
    for r in receivers:
        rp, rq = receiver_hooks(model, name, r, lambda x, r=r: recorded[r])
        pre, post = pre + rp, post + rq
    with torch.no_grad():
        return float(logit_diff(hooked(model, CLEAN, pre, post)))


def eap_by_hand(model, name, edge):
    """(corrupt - clean output of the sender) . d metric / d (receiver input), as d/dt at t=0 of the
    metric with the receiver's input moved by t times the sender's delta."""
    sender, receiver = edge.split("->")
    delta = sender_delta(model, name, sender, record(model, name, CLEAN), record(model, name, CORRUPT))
    t = torch.zeros((), requires_grad=True)
    pre, post = receiver_hooks(model, name, receiver, lambda x: x + t * delta)
    return float(torch.autograd.grad(logit_diff(hooked(model, CLEAN, pre, post)), t)[0])


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


# -- the graph ----------------------------------------------------------------------------------------

FAMILIES = ["gpt2", "gpt_neox", "gpt_neox_sequential", "llama", "mistral", "qwen2", "gemma"]


@pytest.mark.parametrize("name", FAMILIES)
def test_graph_has_every_edge_of_the_residual_stream(name):
    model = build(name)
    g = nnpatch.graph(model)
    L, H = 3, 4
    kv = {"llama": 2, "mistral": 2, "qwen2": 2, "gemma": 1}.get(name, H)
    parallel = name == "gpt_neox"
    assert (g.n_layers, g.n_heads, g.n_kv, g.parallel) == (L, H, kv, parallel)
    attn = sum((H + 2 * kv) * (1 + i * (H + 1)) for i in range(L))
    mlp = sum(1 + i * (H + 1) + (0 if parallel else H) for i in range(L))
    assert len(g.edges) == attn + mlp + 1 + L * (H + 1)
    assert len(set(g.edges)) == len(g.edges)
    assert ("a1.h2->m1" in g.edges) != parallel and "a2.h0->m1" not in g.edges
    assert g.edges.count("input->a0.h0<k>") == 1 and "m2->logits" in g.edges


@pytest.mark.parametrize("name", FAMILIES)
def test_keeping_every_edge_is_the_clean_run_and_keeping_none_the_corrupt_run(name):
    """Ablating every edge rebuilds each receiver's input from corrupt sender outputs: this only
    gives the corrupt run when the nodes' outputs add up to the residual stream."""
    model = build(name)
    scores = nnpatch.edge_attribution(model, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG)
    full = nnpatch.evaluate_circuit(model, CLEAN, CORRUPT, scores, answer=ANSWER, wrong=WRONG)
    none = Circuit(scores.key, scores.edges, scores.scores, torch.zeros(len(scores.edges), dtype=torch.bool))
    empty = nnpatch.evaluate_circuit(model, CLEAN, CORRUPT, none, answer=ANSWER, wrong=WRONG)
    span = abs(full.clean_score - full.corrupt_score)
    assert span > 1e-3
    assert abs(full.score - full.clean_score) < 1e-5 * span
    assert abs(empty.score - empty.corrupt_score) < 1e-4 * span
    assert no_hooks_left(model)


@pytest.mark.parametrize("name", ["gemma2", "bert"])
def test_graph_of_unsupported_architectures_says_why(name):
    with pytest.raises(nnpatch.NNPatchError, match="register_graph"):
        nnpatch.graph(build(name))


# -- path patching --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,sender,receivers", [
    ("gpt2", "a0.h2", ["a2.h3<q>"]), ("gpt2", "a1.h0", ["a2.h0<k>", "a2.h2<v>"]), ("gpt2", "m0", ["m1"]),
    ("gpt2", "a0.h2", ["a1.h1<q>", "a2.h1<q>"]), ("gpt2", "a1.h3", ["logits"]), ("gpt2", "a2.h1", ["m2"]),
    ("llama", "a0.h2", ["a1.h2<q>"]), ("llama", "a0.h1", ["a2.h1<k>", "a1.h0<v>"]), ("llama", "m1", ["logits"]),
])
def test_path_patching_matches_freezing_by_hand(name, sender, receivers):
    model = build(name)
    got = nnpatch.path_patching(model, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, senders=[sender],
                                receivers=receivers, metric="logit_diff_raw")
    want = frozen_path_patching(model, name, sender, receivers)
    assert got.senders == [sender]
    assert abs(float(got.scores[0]) - want) < 5e-6 * max(1.0, abs(want))
    assert abs(got.clean_score - want) > 1e-3  # the path matters, so the check can fail
    assert no_hooks_left(model)


def test_path_patching_of_a_whole_head_and_many_senders_in_one_batch():
    model = build("gpt2")
    got = nnpatch.path_patching(model, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, receivers=["a2.h1"],
                                metric="logit_diff_raw", batch_size=3)
    assert got.senders == [f"a{i}.h{h}" for i in range(2) for h in range(4)]
    for sender, value in zip(got.senders[::3], got.scores[::3].tolist()):
        want = frozen_path_patching(model, "gpt2", sender, ["a2.h1<q>", "a2.h1<k>", "a2.h1<v>"])
        assert abs(value - want) < 5e-6 * max(1.0, abs(want))
    grid = got.heads()
    assert grid.shape == (3, 4) and bool(grid[2].isnan().all()) and not bool(grid[:2].isnan().any())


# -- edge attribution -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,edges", [
    ("gpt2", ["input->a0.h1<q>", "a0.h2->a1.h3<k>", "a1.h0->a2.h2<v>", "a0.h3->m0", "m1->logits", "a2.h1->logits"]),
    ("llama", ["a0.h3->a1.h2<q>", "a0.h1->a2.h1<k>", "m0->a1.h0<v>", "a1.h2->m1", "input->a2.h1<v>"]),
])
def test_eap_scores_are_delta_dot_gradient_by_hand(name, edges):
    model = build(name)
    scores = nnpatch.edge_attribution(model, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG, metric="logit_diff_raw")
    table = {row["edge"]: row["score"] for row in scores.edges_table()}
    for edge in edges:
        want = eap_by_hand(model, name, edge)
        assert abs(table[edge] - want) < 1e-5 * max(1.0, abs(want)), (edge, table[edge], want)
        assert abs(want) > 1e-3, edge  # an edge that matters, so the check can fail
    assert max(abs(v) for v in table.values()) > 1e-2
    assert no_hooks_left(model)


def test_eap_ig_with_one_step_is_eap_and_with_more_steps_averages_gradients():
    model = build("gpt2")
    kw = dict(answer=ANSWER, wrong=WRONG, metric="logit_diff_raw")
    eap = nnpatch.edge_attribution(model, CLEAN, CORRUPT, method="eap", **kw)
    one = nnpatch.edge_attribution(model, CLEAN, CORRUPT, method="eap-ig", steps=1, **kw)
    two = nnpatch.edge_attribution(model, CLEAN, CORRUPT, method="eap-ig", steps=2, **kw)
    assert torch.allclose(eap.scores, one.scores)
    # By hand: the gradient at the halfway embedding and at the clean one, averaged.
    edge = "a0.h2->a1.h3<k>"
    sender, receiver = edge.split("->")
    clean, corrupt = record(model, "gpt2", CLEAN), record(model, "gpt2", CORRUPT)
    delta = sender_delta(model, "gpt2", sender, clean, corrupt)
    grads = []
    for alpha in (0.5, 1.0):
        t = torch.zeros((), requires_grad=True)
        emb = corrupt[2] + alpha * (clean[2] - corrupt[2])
        pre, post = receiver_hooks(model, "gpt2", receiver, lambda x: x + t * delta)
        pre = pre + [(mod(model, ARCH["gpt2"]["block0"]), lambda m, args, kw: with_first(args, kw, emb))]
        grads.append(float(torch.autograd.grad(logit_diff(hooked(model, CLEAN, pre, post)), t)[0]))
    got = two.scores[two.edges.index(edge)].item()
    assert abs(got - sum(grads) / 2) < 1e-5 * max(1.0, abs(got))
    assert abs(got - eap.scores[eap.edges.index(edge)].item()) > 1e-5


# -- circuits: selection, files, errors ----------------------------------------------------------------

def test_selection_tables_and_files(tmp_path):
    model = build("gpt2")
    scores = nnpatch.edge_attribution(model, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG)
    top = scores.top(10)
    assert len(top) == 10 and len(scores) == len(scores.edges)
    ranked = sorted(scores.scores.abs().tolist(), reverse=True)
    assert min(abs(r["score"]) for r in top.edges_table()) == ranked[9]
    assert len(scores.threshold(ranked[4])) == 5
    greedy = scores.greedy(12)
    assert len(greedy) == 12
    # every kept edge's receiver node is reached from the logits through kept edges
    reached = {"logits"}
    kept = [(r["sender"], r["receiver"].split("<")[0]) for r in greedy.edges_table()]
    for _ in kept:
        reached |= {s for s, r in kept if r in reached}
    assert all(r in reached for _, r in kept)
    nodes = {row["node"]: row for row in top.nodes_table()}
    assert set(nodes) == set(top.nodes) and all(row["weight"] > 0 for row in nodes.values())

    path = top.save(tmp_path / "c")
    assert path.suffix == ".safetensors" and path.with_suffix(".json").exists()
    back = Circuit.load(path)
    assert back.kept_edges == top.kept_edges and torch.equal(back.scores, top.scores)
    assert (back.method, back.metric, back.key) == (top.method, top.metric, top.key)
    a = nnpatch.evaluate_circuit(model, CLEAN, CORRUPT, top, answer=ANSWER, wrong=WRONG)
    b = nnpatch.evaluate_circuit(model, CLEAN, CORRUPT, back, answer=ANSWER, wrong=WRONG)
    assert a.score == b.score


def test_bad_input_names_what_is_wrong_and_leaves_the_model_as_it_was():
    model = build("gpt2")
    kw = dict(answer=ANSWER, wrong=WRONG)
    with pytest.raises(nnpatch.NNPatchError, match=r"unknown receiver node 'a9.h0<q>'.*a\{layer\}"):
        nnpatch.path_patching(model, CLEAN, CORRUPT, receivers=["a9.h0<q>"], **kw)
    with pytest.raises(nnpatch.NNPatchError, match=r"unknown sender node 'a0.h7'"):
        nnpatch.path_patching(model, CLEAN, CORRUPT, senders=["a0.h7"], **kw)
    with pytest.raises(nnpatch.NNPatchError, match=r"a2.h0 do not feed any receiver \(a1.h0<q>\)"):
        nnpatch.path_patching(model, CLEAN, CORRUPT, senders=["a2.h0"], receivers=["a1.h0<q>"], **kw)
    with pytest.raises(nnpatch.NNPatchError, match="method 'eep' is unknown"):
        nnpatch.edge_attribution(model, CLEAN, CORRUPT, method="eep", **kw)
    scores = nnpatch.edge_attribution(model, CLEAN, CORRUPT, **kw)
    with pytest.raises(nnpatch.NNPatchError, match=r"threshold\(1000.0\) keeps no edge \(the largest \|score\|"):
        scores.threshold(1e3)
    with pytest.raises(nnpatch.NNPatchError, match="top.0. keeps no edge"):
        scores.top(0)
    llama = build("llama")
    with pytest.raises(nnpatch.NNPatchError, match="another model.*architecture: circuit 'gpt2', model 'llama'"):
        nnpatch.evaluate_circuit(llama, CLEAN, CORRUPT, scores.top(5), **kw)
    with pytest.raises(nnpatch.NNPatchError, match="ablation 'zero' is unknown"):
        nnpatch.evaluate_circuit(model, CLEAN, CORRUPT, scores.top(5), ablation="zero", **kw)
    assert no_hooks_left(model) and no_hooks_left(llama)

    # An error inside the run (here: a block that fails) leaves no hook behind either.
    calls = []

    def fail(m, args):
        calls.append(1)
        if len(calls) > 1:  # the corrupt reference run, after the clean run with leaves
            raise RuntimeError("boom")
    handle = model.transformer.h[2].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            nnpatch.edge_attribution(model, CLEAN, CORRUPT, **kw)
    finally:
        handle.remove()
    assert no_hooks_left(model)


# -- the bundled models: faithful circuits -------------------------------------------------------------

@pytest.mark.parametrize("name,pairs,method,n_edges", [
    ("ioi", lambda: nnpatch.tasks.ioi(16, template=0), "eap-ig", 48),
    ("ioi", lambda: nnpatch.tasks.ioi(16, template=0), "eap", 51),
    ("table-max", lambda: nnpatch.tasks.table_max(16), "eap-ig", 23),
    ("table-max", lambda: nnpatch.tasks.table_max(16), "eap", 39),
])
def test_small_faithful_circuits_on_the_bundled_models(name, pairs, method, n_edges):
    """The sizes are the smallest top-n circuits keeping 90% of the logit difference, found with
    nnpatch.smallest_circuit (docs/circuits.md states them)."""
    model, pairs = nnpatch.models.load(name), pairs()
    scores = nnpatch.edge_attribution(model, pairs, method=method, steps=5)
    circuit = scores.top(n_edges)
    kept = nnpatch.evaluate_circuit(model, pairs, circuit)
    assert kept.fraction >= 0.9 and len(circuit) == n_edges <= len(scores.edges) // 9
    smaller = nnpatch.evaluate_circuit(model, pairs, scores.top(n_edges - 1))
    assert smaller.fraction < 0.9
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        random = torch.zeros(len(scores.edges), dtype=torch.bool)
        random[torch.randperm(len(scores.edges), generator=g)[:n_edges]] = True
        other = nnpatch.evaluate_circuit(model, pairs, Circuit(scores.key, scores.edges, scores.scores, random))
        assert other.normalized < 0.3 and other.fraction < kept.fraction - 1.0


def test_eap_ranks_edges_like_activation_patching_each_edge_on_ioi():
    """Activation patching of each edge alone (all 479 edges of the bundled IOI model, 4 pairs),
    against EAP and EAP-IG. With 16 pairs the rank correlations (Spearman, |score|) are EAP 0.97,
    EAP-IG 0.91 (docs/circuits.md)."""
    from nnpatch.patching.circuit_job import CircuitJob
    from nnpatch.patching.edge_attribution import rank_correlation
    from nnpatch.patching.faithfulness import score_circuits
    model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(4, template=0)
    eap = nnpatch.edge_attribution(model, pairs, metric="logit_diff_raw")
    ig = nnpatch.edge_attribution(model, pairs, method="eap-ig", steps=5, metric="logit_diff_raw")
    cj = CircuitJob(model, pairs, None, None, None, "logit_diff_raw")
    one_out = []
    for i in range(len(eap.edges)):
        kept = torch.ones(len(eap.edges), dtype=torch.bool)
        kept[i] = False
        one_out.append(Circuit(eap.key, eap.edges, eap.scores, kept))
    act = torch.tensor([r.score for r in score_circuits(cj, one_out, "patch")]) - cj.clean_score
    assert rank_correlation(eap.scores.abs(), act.abs()) > 0.95
    assert rank_correlation(eap.scores, act) > 0.75
    assert rank_correlation(ig.scores.abs(), act.abs()) > 0.85
    # Patching one edge alone is path patching from its sender to its receiver.
    for edge in ["a2.h0->a3.h0<q>", "a0.h3->m0", "m1->logits"]:
        sender, receiver = edge.split("->")
        pp = nnpatch.path_patching(model, pairs, senders=[sender], receivers=[receiver], metric="logit_diff_raw")
        assert abs(float(pp.change[0]) - float(act[eap.edges.index(edge)])) < 1e-4


def test_grouped_key_value_receivers_feed_every_head_of_their_group():
    model = build("llama")  # 4 query heads, 2 key/value heads
    scores = nnpatch.edge_attribution(model, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG)
    assert scores.receiver_nodes("a1.h1<k>") == ["a1.h2", "a1.h3"]
    assert scores.receiver_nodes("a1.h1<q>") == ["a1.h1"] and scores.receiver_nodes("m1") == ["m1"]
    one = torch.tensor([e == "input->a1.h1<v>" for e in scores.edges])
    circuit = Circuit(scores.key, scores.edges, scores.scores, one)
    assert circuit.nodes == ["input", "a1.h2", "a1.h3"]
    greedy = scores.greedy(30)
    reached = {"logits"}
    kept = [(r["sender"], greedy.receiver_nodes(r["receiver"])) for r in greedy.edges_table()]
    for _ in kept:
        reached |= {s for s, nodes in kept if not reached.isdisjoint(nodes)}
    assert all(not reached.isdisjoint(nodes) for _, nodes in kept)


def test_one_token_prompts(monkeypatch):
    import test_circuits as here
    monkeypatch.setattr(here, "CLEAN", [[5], [7]])
    monkeypatch.setattr(here, "CORRUPT", [[9], [11]])
    monkeypatch.setattr(here, "ANSWER", [20, 21])
    monkeypatch.setattr(here, "WRONG", [22, 23])
    model = build("gpt2")
    kw = dict(answer=here.ANSWER, wrong=here.WRONG, metric="logit_diff_raw")
    scores = nnpatch.edge_attribution(model, here.CLEAN, here.CORRUPT, **kw)
    for edge in ["input->a1.h2<v>", "a0.h1->m2", "m1->logits"]:
        want = eap_by_hand(model, "gpt2", edge)
        assert abs(scores.scores[scores.edges.index(edge)].item() - want) < 1e-5 * max(1.0, abs(want))
    got = nnpatch.path_patching(model, here.CLEAN, here.CORRUPT, senders=["a0.h3"], receivers=["a2.h0<k>"], **kw)
    want = frozen_path_patching(model, "gpt2", "a0.h3", ["a2.h0<k>"])
    assert abs(float(got.scores[0]) - want) < 5e-6 * max(1.0, abs(want))
    none = Circuit(scores.key, scores.edges, scores.scores, torch.zeros(len(scores.edges), dtype=torch.bool))
    empty = nnpatch.evaluate_circuit(model, here.CLEAN, here.CORRUPT, none, **kw)
    assert abs(empty.score - empty.corrupt_score) < 1e-4 * abs(empty.clean_score - empty.corrupt_score)


def test_pairs_of_different_lengths_average_like_the_pairs_alone():
    model = build("gpt2")
    long_c, long_k = CLEAN[:2], CORRUPT[:2]
    short_c, short_k = [[3, 4, 5]], [[3, 4, 13]]
    both = dict(answer=ANSWER[:2] + [30], wrong=WRONG[:2] + [31], metric="logit_diff_raw")
    mixed = nnpatch.edge_attribution(model, long_c + short_c, long_k + short_k, **both)
    a = nnpatch.edge_attribution(model, long_c, long_k, answer=ANSWER[:2], wrong=WRONG[:2], metric="logit_diff_raw")
    b = nnpatch.edge_attribution(model, short_c, short_k, answer=[30], wrong=[31], metric="logit_diff_raw")
    assert torch.allclose(mixed.scores, (2 * a.scores + b.scores) / 3, atol=1e-5)
    top = mixed.top(20)
    ev = nnpatch.evaluate_circuit(model, long_c + short_c, long_k + short_k, top, **both)
    ea = nnpatch.evaluate_circuit(model, long_c, long_k, Circuit(a.key, a.edges, a.scores, top.kept),
                                  answer=ANSWER[:2], wrong=WRONG[:2], metric="logit_diff_raw")
    eb = nnpatch.evaluate_circuit(model, short_c, short_k, Circuit(b.key, b.edges, b.scores, top.kept),
                                  answer=[30], wrong=[31], metric="logit_diff_raw")
    assert abs(ev.score - (2 * ea.score + eb.score) / 3) < 1e-5
    pp = nnpatch.path_patching(model, long_c + short_c, long_k + short_k, receivers=["m2"], **both)
    pa = nnpatch.path_patching(model, long_c, long_k, receivers=["m2"], answer=ANSWER[:2], wrong=WRONG[:2],
                               metric="logit_diff_raw")
    pb = nnpatch.path_patching(model, short_c, short_k, receivers=["m2"], answer=[30], wrong=[31],
                               metric="logit_diff_raw")
    assert torch.allclose(pp.scores, (2 * pa.scores + pb.scores) / 3, atol=1e-5)


def test_kl_metric_is_zero_for_the_whole_model_and_the_corrupt_kl_for_no_edges():
    model = build("llama")
    scores = nnpatch.edge_attribution(model, CLEAN, CORRUPT, metric="kl")
    full = nnpatch.evaluate_circuit(model, CLEAN, CORRUPT, scores, metric="kl")
    none = Circuit(scores.key, scores.edges, scores.scores, torch.zeros(len(scores.edges), dtype=torch.bool))
    empty = nnpatch.evaluate_circuit(model, CLEAN, CORRUPT, none, metric="kl")
    assert abs(full.score) < 1e-6 and full.clean_score == pytest.approx(0.0, abs=1e-6)
    assert empty.score == pytest.approx(empty.corrupt_score, rel=1e-4) and empty.corrupt_score > 1e-3
    # At the clean run KL is at its minimum, so EAP's first-order scores vanish.
    assert scores.scores.abs().max() < 1e-4


def test_evaluate_circuit_without_a_circuit_says_what_to_pass():
    model = build("gpt2")
    with pytest.raises(nnpatch.NNPatchError, match=r"needs circuit=<a Circuit or a list of them>.*got \['list'\]"):
        nnpatch.evaluate_circuit(model, CLEAN, CORRUPT, [CLEAN], answer=ANSWER, wrong=WRONG)
    with pytest.raises(nnpatch.NNPatchError, match="needs circuit=.*got none"):
        nnpatch.evaluate_circuit(model, CLEAN, CORRUPT, answer=ANSWER, wrong=WRONG)
