"""The workbench v2 session logic, driven without a browser: tokens that follow the prompts, the
answer warning and probabilities, out-of-date marking, history, the context-length preview, the
all-pairs mean with its per-pair spread, layer x head x pos cells, and the extension points.

Numbers are compared with nnpatch's public API and with the plain-PyTorch hook reference of
conftest on the bundled ioi model's weights.
"""
import pytest
import torch

import nnpatch
from conftest import patching_reference, site_places
from nnpatch.errors import NNPatchError
from nnpatch.jupyter.controller import STALE, Settings, WorkbenchController
from nnpatch.jupyter.runs import pooled, spread

PAIRS = nnpatch.tasks.ioi(4, seed=3, template=0)
PAIR = PAIRS[0]
README_CLEAN = "When Mary and John went to the store, John gave a drink to"
README_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
GPT2 = {"resid_pre": "transformer.h.{i}.input", "head_out": "transformer.h.{i}.attn.c_proj.input"}
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return nnpatch.models.load("ioi")


def assert_close(a, b, tol=TOL):
    assert abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b))), (a, b)


def plain_probs(model, prompt):
    """Next-token probabilities of the plain Hugging Face model, no nnpatch in between."""
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        return torch.softmax(model.module(ids).logits[0, -1].float(), -1)


def tid(model, token):
    ids = model.tokenizer(token)["input_ids"]
    assert len(ids) == 1, token
    return ids[0]


def single(pair, **kw):
    return Settings(pair.clean, pair.corrupt, pair.answer, pair.wrong, **kw)


# -- tokens that follow the prompts ----------------------------------------------------------------
def test_example_tokens_are_resuggested_when_the_prompts_no_longer_fit(model):
    """The issue's reproducer: pick example 4, type the README's prompts, Run."""
    wb = nnpatch.Workbench(model, nnpatch.tasks.ioi(8, seed=3))
    c = wb.controls
    c.pair = 3
    example = wb.controller.pairs[3]
    assert (c.answer, c.wrong) == (example["answer"], example["wrong"])
    assert example["answer"].strip() not in README_CLEAN  # another name: it does not fit the new prompts
    c.pair = -1  # what typing does first
    c.clean, c.corrupt = README_CLEAN, README_CORRUPT
    assert (c.answer, c.wrong) == (" Mary", " John")
    assert c.warning == ""
    wb.run()
    assert c.message == "" and c.summary["probs"]["answer"]["clean"] > 0.5


def test_typed_tokens_stay_and_example_tokens_that_fit_stay(model):
    wb = nnpatch.Workbench(model, [(README_CLEAN, README_CORRUPT, " Mary", " John")])
    c = wb.controls
    c.pair = -1
    c.clean = README_CLEAN.replace("store", "park")  # the example's names still fit
    assert (c.answer, c.wrong) == (" Mary", " John")
    c.answer = " Alice"  # typed by the user: kept, but warned about
    c.clean, c.corrupt = README_CLEAN, README_CORRUPT
    assert c.answer == " Alice"
    assert "' Alice' is not among the clean run's top 8" in c.warning and "p = 0.000" in c.warning


def test_answer_warning_and_probabilities_equal_the_plain_model(model):
    ctl = WorkbenchController(model)
    probs = plain_probs(model, README_CLEAN)
    rank = probs.argsort(descending=True).tolist()
    outside, inside = model.tokenizer.decode([rank[8]]), model.tokenizer.decode([rank[7]])  # 9th and 8th
    bad = Settings(README_CLEAN, README_CORRUPT, outside, " John")
    assert f"{outside!r} is not among the clean run's top 8" in ctl.warning(bad)
    assert f"p = {float(probs[rank[8]]):.3f}" in ctl.warning(bad)
    assert ctl.warning(Settings(README_CLEAN, README_CORRUPT, inside, " John")) == ""
    good = Settings(README_CLEAN, README_CORRUPT, " Mary", " John")
    assert ctl.warning(good) == ""
    probs = ctl.probabilities(good)
    for run, prompt in (("clean", README_CLEAN), ("corrupt", README_CORRUPT)):
        p = plain_probs(model, prompt)
        assert_close(probs["answer"][run], p[tid(model, " Mary")], 1e-5)
        assert_close(probs["wrong"][run], p[tid(model, " John")], 1e-5)
    # The pickers' options are the plain model's top-8, with the same probabilities.
    top = plain_probs(model, README_CLEAN).topk(8)
    assert [t for t, _ in ctl.predictions(README_CLEAN)] == [model.tokenizer.decode([i]) for i in top.indices]
    for (_, p), q in zip(ctl.predictions(README_CLEAN), top.values):
        assert_close(p, q, 1e-5)


def test_outcome_probabilities_are_the_runs_softmax(model):
    ctl = WorkbenchController(model)
    s = single(PAIR)
    ctl.run(s)
    cell = (1, PAIR.meta["s2"])
    outcome = ctl.inspect(cell)
    api = nnpatch.sweep.patch_cells(model, PAIR.clean, PAIR.corrupt, [cell], answer=PAIR.answer, wrong=PAIR.wrong)
    for run in ("clean", "corrupt", "patched"):
        p = torch.softmax(getattr(api, f"{run}_logits")[0], -1)
        assert_close(outcome.probs[run]["answer"], p[tid(model, PAIR.answer)], 1e-5)
        assert_close(outcome.probs[run]["wrong"], p[tid(model, PAIR.wrong)], 1e-5)
    assert_close(outcome.probs["clean"]["answer"], plain_probs(model, PAIR.clean)[tid(model, PAIR.answer)], 1e-4)


# -- the context length ----------------------------------------------------------------------------
def test_a_prompt_longer_than_the_context_is_named_before_run(model):
    ctl = WorkbenchController(model)
    words = " and".join([" Mary"] * 40)  # 80 tokens: " Mary", " and", ...
    long_clean, long_corrupt = "When" + words, "When" + words.replace("Mary", "John")
    n = len(model.to_tokens(long_clean))
    assert n > model.module.config.n_positions == 64
    preview = ctl.preview(long_clean, long_corrupt)
    assert f"{n} tokens; this model reads at most 64" in preview.warning
    assert ctl.predictions(long_clean) == []  # the model is not run on what it cannot read
    with pytest.raises(NNPatchError, match="this model reads at most 64"):
        ctl.run(Settings(long_clean, long_corrupt, " Mary", " John"))
    wb = nnpatch.Workbench(model)
    wb.controls.clean, wb.controls.corrupt = long_clean, long_corrupt
    assert wb.controls.message == "" and "reads at most 64" in wb.controls.preview["warning"]


# -- out of date -----------------------------------------------------------------------------------
def test_changed_inputs_mark_the_run_stale_and_refuse_clicks(model):
    wb = nnpatch.Workbench(model, PAIRS)
    c, i, ctl = wb.controls, wb.inspector, wb.controller
    assert not c.stale  # nothing shown yet
    wb.run()
    assert not c.stale and not i.stale
    shown = ctl.result.values.clone()
    for name, value in (("answer", PAIR.wrong), ("site", "resid_mid"), ("metric", "prob"), ("direction", "noise"),
                        ("clean", README_CLEAN), ("pair", -2)):
        before = getattr(c, name)
        setattr(c, name, value)
        assert c.stale and i.stale and "nnp-stale" in wb._heatmap_box._dom_classes, name
        wb.inspect((0, 0))
        assert i.message == STALE and ctl.inspected is None
        wb.toggle((0, 0))
        assert i.message == STALE and ctl.selection == []
        setattr(c, name, before)
        if name == "clean":
            c.pair = 0
        assert not c.stale and "nnp-stale" not in wb._heatmap_box._dom_classes, name
    with pytest.raises(NNPatchError, match="inputs changed: Run first"):
        ctl.edit(single(PAIR, metric="prob"))
        ctl.patch_selected()
    ctl.edit(single(PAIR))
    # A click on the stale heatmap changed nothing; a new Run makes it fresh again.
    assert torch.equal(ctl.result.values, shown)
    c.answer = PAIR.wrong
    c.wrong = PAIR.answer
    wb.run()
    assert not c.stale and ctl.settings.answer == PAIR.wrong
    # With all pairs, the fields the run ignores (pair 1's prompts and tokens, every pair having its
    # own) do not make it stale; everything it uses does.
    c.pair = -2
    wb.run()
    c.answer = " Kate"
    assert not c.stale
    c.pair, c.clean = -1, README_CLEAN  # what typing does: your own prompts, one pair
    assert c.stale
    c.pair = -2
    assert not c.stale
    c.site = "resid_mid"
    assert c.stale


# -- history ---------------------------------------------------------------------------------------
def test_history_goes_back_and_forward_with_the_inputs(model):
    wb = nnpatch.Workbench(model, PAIRS)
    c, ctl = wb.controls, wb.controller
    wb.run()
    first = ctl.result
    c.granularity = "layer × head"
    wb.run()
    second = ctl.result
    assert c.history["index"] == 1 and len(c.history["runs"]) == 2
    wb.go("back")
    assert ctl.result is first and c.granularity == "layer × pos" and c.site == "resid_pre"
    assert not c.stale and c.clean == PAIR.clean and c.pair == 0
    wb.inspect((1, PAIR.meta["s2"]))
    assert wb.inspector.message == "" and wb.inspector.detail["heatmap_value"] == pytest.approx(float(first.values[1, PAIR.meta["s2"]]))
    wb.go("back")
    assert "first run" in c.message
    wb.go("forward")
    assert ctl.result is second and c.granularity == "layer × head"
    wb.compare(0)
    assert c.message == "" and c.history["extra"] == "compare"
    zs = [torch.tensor(d.z) for d in wb.extra.data]
    assert torch.allclose(zs[0], first.values) and torch.allclose(zs[1], second.values)
    with pytest.raises(NNPatchError, match="another run"):
        ctl.compare(1)


# -- all pairs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("site,by", [("resid_pre", ("layer", "pos")), ("head_out", ("layer", "head"))])
def test_all_pairs_is_activation_patching_on_the_pairs(model, site, by):
    ctl = WorkbenchController(model, PAIRS)
    s = Settings(PAIR.clean, PAIR.corrupt, "", "", site=site, by=by, all_pairs=True)
    result = ctl.run(s)
    api = nnpatch.activation_patching(model, PAIRS, site=site, by=by, progress=False)
    assert torch.allclose(result.values, api.values, atol=TOL)
    assert_close(result.clean_score, api.clean_score)
    per_pair = ctl.history.current.per_pair
    assert len(per_pair) == len(PAIRS)
    for pair, r in zip(PAIRS, per_pair):
        one = nnpatch.activation_patching(model, pair.clean, pair.corrupt, answer=pair.answer, wrong=pair.wrong,
                                          site=site, by=by, progress=False)
        assert torch.allclose(r.values, one.values, atol=TOL)
    # The batched mean is exactly what the per-pair results pool to.
    assert torch.allclose(pooled(per_pair, True).float(), result.values, atol=TOL)
    low, high, std = spread(per_pair)
    stack = torch.stack([r.values for r in per_pair])
    assert torch.equal(low, stack.min(0).values) and torch.equal(high, stack.max(0).values)
    # The hover shows each cell's spread.
    fig = ctl.figure()
    cell = (1, PAIR.meta["s2"]) if by[1] == "pos" else (3, 1)
    assert f"min {float(low[cell]):.3f}, max {float(high[cell]):.3f}, std {float(std[cell]):.3f}" in fig.data[0].text[cell[0]][cell[1]]
    assert "%{text}" in fig.data[0].hovertemplate
    # Inspecting a cell patches it on every pair: patch_cells, and the hook reference.
    outcome = ctl.inspect(cell)
    assert_close(outcome.normalized, result.values[cell])
    net, tok = model.module, model.tokenizer
    axis = by[1]
    ref = patching_reference(net, site_places(net, GPT2), [tok(p.clean)["input_ids"] for p in PAIRS],
                             [tok(p.corrupt)["input_ids"] for p in PAIRS], [[{"layer": cell[0], axis: cell[1]}]],
                             site=site, answer=[tid(model, p.answer) for p in PAIRS],
                             wrong=[tid(model, p.wrong) for p in PAIRS])
    assert_close(outcome.normalized, ref.values[0])
    assert outcome.pairs == len(PAIRS)
    p = torch.softmax(ref.clean_logits.float(), -1)
    assert_close(outcome.probs["clean"]["answer"], p[torch.arange(len(PAIRS)), [tid(model, x.answer) for x in PAIRS]].mean())
    assert ctl.pair_figure().data[0].z is not None and len(ctl.pair_figure().data) == len(PAIRS)


def test_all_pairs_code_reproduces_the_mean(model):
    ctl = WorkbenchController(model, PAIRS)
    result = ctl.run(Settings(PAIR.clean, PAIR.corrupt, "", "", all_pairs=True))
    ctl.inspect((0, PAIR.meta["s2"]))
    namespace = {}
    exec(compile(ctl.code(), "<workbench code>", "exec"), namespace)  # noqa: S102 - the code under test
    assert torch.allclose(namespace["result"].values, result.values, atol=TOL)
    assert_close(namespace["cell"].score, result.values[0, PAIR.meta["s2"]])
    assert len(namespace["per_pair"]) == len(PAIRS)


def test_all_pairs_of_different_lengths_by_position_says_why(model):
    wb = nnpatch.Workbench(model, nnpatch.tasks.ioi(8))  # mixed templates: 14 to 17 tokens
    wb.controls.pair = -2
    wb.run()
    assert "same number of tokens" in wb.controls.message and wb.controller.result is None
    wb.controls.granularity = "layer × head"
    wb.run()
    assert wb.controls.message == "" and wb.controls.summary["pairs"] == 8
    # Eight small heatmaps, one per pair, in two rows of four.
    fig, per_pair = wb.controller.pair_figure(), wb.controller.history.current.per_pair
    for k, (trace, r) in enumerate(zip(fig.data, per_pair)):
        assert torch.allclose(torch.tensor(trace.z, dtype=torch.float32), r.values, atol=1e-6), k
    assert fig.layout.yaxis5.domain[1] < fig.layout.yaxis.domain[0] and fig.layout.xaxis5.domain == fig.layout.xaxis.domain


# -- layer x head x pos ----------------------------------------------------------------------------
def test_layer_head_pos_cells_map_back_from_the_heatmap(model):
    ctl = WorkbenchController(model)
    s = single(PAIR, site="head_out", by=("layer", "head", "pos"))
    result = ctl.run(s)
    n_layers, n_heads, n_pos = result.values.shape
    assert n_layers == n_heads == 4  # equal sizes on purpose: a swapped index would still be in range
    z = torch.tensor(ctl.figure().data[0].z)
    for layer, head, pos in [(0, 3, 2), (3, 0, PAIR.meta["s2"]), (2, 1, n_pos - 1)]:
        row = layer * n_heads + head
        assert ctl.cell(row, pos) == (layer, head, pos)
        assert_close(z[row, pos], result.values[layer, head, pos])
    layer, head, pos = cell = ctl.cell(3 * n_heads + 1, PAIR.meta["end"])
    outcome = ctl.inspect(cell)
    api = nnpatch.sweep.patch_cells(model, PAIR.clean, PAIR.corrupt, [cell], site="head_out",
                                    by=("layer", "head", "pos"), answer=PAIR.answer, wrong=PAIR.wrong)
    assert_close(outcome.normalized, api.score)
    assert_close(outcome.normalized, result.values[cell])
    net, tok = model.module, model.tokenizer
    ref = patching_reference(net, site_places(net, GPT2), [tok(PAIR.clean)["input_ids"]], [tok(PAIR.corrupt)["input_ids"]],
                             [[{"layer": layer, "head": head, "pos": pos}]], site="head_out",
                             answer=[tid(model, PAIR.answer)], wrong=[tid(model, PAIR.wrong)])
    assert_close(outcome.normalized, ref.values[0])
    assert outcome.label.startswith(f"layer {layer}, head {head}, pos {pos}")
    ctl.toggle(cell)
    boxes = [(b.y0 + 0.5, b.x0 + 0.5) for b in ctl.figure().layout.shapes]
    assert boxes == [(layer * n_heads + head, pos)] * 2  # the selection box and the inspected outline
    with pytest.raises(NNPatchError, match="outside the heatmap"):
        ctl.cell(n_layers * n_heads, 0)


# -- extension points ------------------------------------------------------------------------------
def test_tabs_and_callbacks(model):
    import ipywidgets
    wb = nnpatch.Workbench(model, PAIRS)
    extra = ipywidgets.HTML("attention")
    wb.add_tab("Attention", extra)
    assert wb.tabs.titles[0] == "Patching" and wb.tabs.titles[-1] == "Attention" and wb.tabs.children[-1] is extra
    runs, inspected = [], []
    wb.on_run(lambda: runs.append(wb.controller.result))
    wb.on_inspect(lambda cell, settings: inspected.append((cell, settings)))
    wb.controls.clean = ""
    wb.run()
    assert runs == []  # a failed run tells no one
    wb.controls.pair = -1
    wb.controls.pair = 0
    wb.run()
    assert runs == [wb.controller.result]
    wb.controls.granularity = "layer × head × pos"
    wb.run()
    row, col = 2 * 4 + 3, PAIR.meta["s2"]
    wb.inspect(wb.controller.cell(row, col))
    assert inspected == [((2, 3, col), wb.controller.settings)] and len(runs) == 2

    def broken(cell, settings):
        raise RuntimeError("tab failed")
    wb.on_inspect(broken)
    wb.inspect((0, 0, 0))
    assert "tab failed" in wb.inspector.message and isinstance(wb.last_error, RuntimeError)
    assert wb.inspector.detail["cells"] == [[0, 0, 0]]  # the patching tab still shows its cell


def test_the_workbench_opens_with_every_tab(model):
    wb = nnpatch.Workbench(model, PAIRS)
    assert wb.tabs.titles == ("Patching", "Head", "Logit lens", "Noise", "Sites", "Circuit")
    assert wb.tabs.children[-1] is wb.circuit and wb.circuit.controller.pairs == wb.controller.pairs
    assert nnpatch.Workbench(model).tabs.titles[-1] == "Sites"  # no pairs: no task for a circuit


def test_all_pairs_cell_equals_the_patch_magic_on_the_pairs(model):
    """The mean view's cell is what `%%patch model --clean pairs` measures for the same patch."""
    pytest.importorskip("IPython")
    from IPython.testing.globalipapp import get_ipython
    from IPython.utils.capture import capture_output
    ctl = WorkbenchController(model, PAIRS)
    result = ctl.run(Settings(PAIR.clean, PAIR.corrupt, "", "", all_pairs=True))
    layer, pos = 1, PAIR.meta["s2"]
    outcome = ctl.inspect((layer, pos))
    ip = get_ipython()
    ip.run_line_magic("load_ext", "nnpatch")
    ip.user_ns.update(wb_model=model, wb_pairs=PAIRS)
    with capture_output():
        res = ip.run_cell("%%patch wb_model --clean wb_pairs --out wb_effect\n"
                          f"wb_model.transformer.h[{layer}].input[:, {pos}] = clean.transformer.h[{layer}].input[:, {pos}]\n")
    assert res.error_in_exec is None
    effect = ip.user_ns["wb_effect"]
    assert_close(effect.effect, result.values[layer, pos])
    assert_close(effect.effect, outcome.normalized)
    assert_close(effect.patched_score, outcome.patched_score)
    assert_close(effect.clean_score, result.clean_score)


def test_figures_take_the_width_the_page_measured(model):
    wb = nnpatch.Workbench(model, PAIRS)
    assert wb.heatmap._config["displaylogo"] is False and wb.heatmap._config["responsive"] is True
    wb.run()
    assert wb.heatmap.layout.width is None  # not measured yet: plotly sizes it
    wb.inspector.plot_width, wb.inspector.row_width = 512, 900  # what inspector.js reports
    assert wb.heatmap.layout.width == 512
    wb.controls.pair = -2
    wb.run()
    assert wb.heatmap.layout.width == 512  # a new run keeps the measured width
    wb.show_pairs()
    assert wb.extra.layout.width == 900 and len(wb.extra.data) == len(PAIRS)
    wb.inspector.plot_width = 380  # the page narrowed: the inspector moved below
    assert wb.heatmap.layout.width == 380
