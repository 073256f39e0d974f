"""The workbench's logic, driven without a browser, against the Python API and plain hooks.

Every number the workbench shows (heatmap, a cell's scores and top-k, a selection patched
together, the exported code) is compared with nnpatch's public API and with a hand-written
plain-PyTorch hook reference on the bundled ioi model's weights.
"""
import pytest
import torch

import nnpatch
from conftest import patching_reference, site_places
from nnpatch.errors import NNPatchError
from nnpatch.jupyter.controller import Settings, WorkbenchController

PAIR = nnpatch.tasks.ioi(1, seed=1, template=0)[0]  # "When A and B went to the <place>, S gave ..."
RESID = Settings(PAIR.clean, PAIR.corrupt, PAIR.answer, PAIR.wrong, site="resid_pre", by=("layer", "pos"))
HEADS = Settings(PAIR.clean, PAIR.corrupt, PAIR.answer, PAIR.wrong, site="head_out", by=("layer", "head"))
MLP = Settings(PAIR.clean, PAIR.corrupt, PAIR.answer, PAIR.wrong, site="mlp_out", by=("layer", "pos"))
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return nnpatch.models.load("ioi")


@pytest.fixture(scope="module")
def ran(model):
    """A controller after one run of each granularity (the runs are the slow part)."""
    out = {}
    for name, settings in (("resid", RESID), ("heads", HEADS), ("mlp", MLP)):
        ctl = WorkbenchController(model)
        out[name] = (ctl, ctl.run(settings))
    return out


# -- the plain-PyTorch reference -----------------------------------------------------------------
# The ioi model is a GPT-2: resid_pre is the input of block `layer`; head_out is the input of the
# attention's output projection, whose last dimension is the heads' outputs side by side; mlp_out
# is the MLP's output. Written out by hand, not read from nnpatch's site table.
GPT2 = {"resid_pre": "transformer.h.{i}.input", "head_out": "transformer.h.{i}.attn.c_proj.input",
        "mlp_out": "transformer.h.{i}.mlp.output"}


def reference(model, s: Settings, cells):
    """Patch `cells` of the clean run into the corrupt run with the shared plain-hook reference.

    A cell is (layer, position), or (layer, head) for head_out (every position of that head).
    Returns the last-position logits of the clean, corrupt and patched runs and their logit
    differences."""
    net, tok = model.module, model.tokenizer
    axis = "head" if s.site == "head_out" else "pos"
    ref = patching_reference(net, site_places(net, GPT2), [tok(s.clean)["input_ids"]], [tok(s.corrupt)["input_ids"]],
                             [[{"layer": layer, axis: i} for layer, i in cells]], site=s.site,
                             answer=tok(s.answer)["input_ids"][:1], wrong=tok(s.wrong)["input_ids"][:1])
    logits = {"clean": ref.clean_logits[0], "corrupt": ref.corrupt_logits[0], "patched": ref.patched_logits[0, 0]}
    diff = {"clean": ref.clean_score, "corrupt": ref.corrupt_score, "patched": float(ref.scores[0]),
            "normalized": float(ref.values[0])}
    return logits, diff


def assert_close(a, b, tol=TOL):
    assert abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b))), (a, b)


def assert_outcome_matches(model, outcome, s, cells):
    logits, diff = reference(model, s, cells)
    for key in ("clean", "corrupt", "patched"):
        assert_close(getattr(outcome, f"{key}_score"), diff[key])
        probs = torch.softmax(logits[key], -1)
        ids = probs.topk(len(outcome.top[key])).indices.tolist()
        assert [t for t, _ in outcome.top[key]] == [model.tokenizer.decode([i]) for i in ids]
        for (_, p), i in zip(outcome.top[key], ids):
            assert_close(p, probs[i])
    assert_close(outcome.normalized, diff["normalized"])


# -- the heatmap ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,settings", [("resid", RESID), ("heads", HEADS)])
def test_run_is_the_api_sweep(model, ran, name, settings):
    ctl, result = ran[name]
    api = nnpatch.activation_patching(model, settings.clean, settings.corrupt, answer=settings.answer,
                                      wrong=settings.wrong, metric=settings.metric, site=settings.site,
                                      by=settings.by)
    assert tuple(result.dims) == settings.by
    assert torch.allclose(result.values, api.values, atol=TOL)
    n_pos = len(model.to_tokens(PAIR.clean))
    assert tuple(result.values.shape) == (4, n_pos if name == "resid" else 4)
    _, diff = reference(model, settings, [])
    assert_close(result.clean_score, diff["clean"])
    assert_close(result.corrupt_score, diff["corrupt"])


def test_heatmap_cells_equal_the_hook_reference(model, ran):
    ctl, result = ran["resid"]
    s2 = PAIR.meta["s2"]  # the repeated name: where the clean and corrupt prompts differ
    for cell in [(0, s2), (3, s2), (2, 0), (3, PAIR.meta["end"])]:
        assert_close(result.values[cell], reference(model, RESID, [cell])[1]["normalized"])


def test_figure_is_the_result_plot_with_boxes(ran):
    ctl, result = ran["resid"]
    ctl.selection, ctl.inspected = [(1, 2), (3, 4)], (0, 5)
    fig = ctl.figure()
    z = torch.tensor(fig.data[0].z, dtype=torch.float32)
    assert torch.allclose(z, result.values, atol=1e-6)  # heatmap rows are layers, columns positions
    boxes = [(s.y0 + 0.5, s.x0 + 0.5) for s in fig.layout.shapes]
    assert boxes == [(1, 2), (3, 4), (0, 5)]
    assert fig.layout.shapes[2].line.dash == "dot"
    ctl.selection, ctl.inspected = [], None


# -- cells ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,settings,cell", [("resid", RESID, (1, PAIR.meta["s2"])), ("heads", HEADS, (3, 2))])
def test_inspect_equals_heatmap_api_and_reference(model, ran, name, settings, cell):
    ctl, result = ran[name]
    outcome = ctl.inspect(cell)
    assert ctl.inspected == cell and outcome.cells == (cell,)
    assert_close(outcome.heatmap_value, result.values[cell])
    assert_close(outcome.normalized, result.values[cell])
    api = nnpatch.sweep.patch_cells(model, settings.clean, settings.corrupt, [cell], site=settings.site,
                                    by=settings.by, answer=settings.answer, wrong=settings.wrong)
    assert_close(outcome.patched_score, api.patched_score)
    assert_outcome_matches(model, outcome, settings, [cell])


def test_patch_selected_patches_the_cells_together(model, ran):
    ctl, result = ran["mlp"]
    ctl.clear_selection()
    end = PAIR.meta["end"]
    cells = [(2, end), (1, end)]  # two MLPs that each recover part of the answer at the last token
    for c in cells + [(0, 0)]:
        ctl.toggle(c)
    assert ctl.toggle((0, 0)) == cells  # a second click unselects
    outcome = ctl.patch_selected()
    assert outcome.cells == tuple(sorted(cells)) and outcome.heatmap_value is None
    api = nnpatch.sweep.patch_cells(model, MLP.clean, MLP.corrupt, sorted(cells), site="mlp_out",
                                    by=("layer", "pos"), answer=MLP.answer, wrong=MLP.wrong)
    assert_close(outcome.normalized, api.score)
    assert_outcome_matches(model, outcome, MLP, cells)
    # Both cells act: together they do more than either alone.
    assert all(outcome.normalized > float(result.values[c]) + 0.05 for c in cells)
    ctl.clear_selection()


def test_shown_code_reproduces_the_numbers(model, ran):
    ctl, result = ran["resid"]
    cell, cells = (1, PAIR.meta["s2"]), [(0, PAIR.meta["io"]), (3, PAIR.meta["end"])]
    inspected = ctl.inspect(cell)
    ctl.clear_selection()
    for c in cells:
        ctl.toggle(c)
    together = ctl.patch_selected()
    code = ctl.code()
    assert 'model = nnpatch.models.load("ioi")' in code or "model = nnpatch.models.load('ioi')" in code
    assert "nnpatch.activation_patching(" in code and "nnpatch.sweep.patch_cells(" in code
    namespace = {}
    exec(compile(code, "<workbench code>", "exec"), namespace)  # noqa: S102 - the code under test
    assert torch.allclose(namespace["result"].values, result.values, atol=TOL)
    assert_close(namespace["cell"].score, inspected.normalized)
    assert_close(namespace["patched"].score, together.normalized)
    assert_close(namespace["patched"].patched_score, together.patched_score)
    ctl.clear_selection()


# -- before a run ---------------------------------------------------------------------------------
def test_preview_shows_tokens_positions_and_differences(model):
    ctl = WorkbenchController(model)
    p = ctl.preview(PAIR.clean, PAIR.corrupt)
    assert [t.text for t in p.clean] == model.to_str_tokens(PAIR.clean)
    assert p.differ == [PAIR.meta["s2"]] and p.warning == ""
    shorter = PAIR.corrupt.replace(" went to", " went")
    p = ctl.preview(PAIR.clean, shorter)
    n, m = len(model.to_tokens(PAIR.clean)), len(model.to_tokens(shorter))
    assert f"clean has {n} tokens, corrupt has {m}" in p.warning
    assert "position 5" in p.warning  # " to" is dropped at position 5 ("When A and B went to")
    p = ctl.preview(PAIR.clean.replace(" went", " wentt"), PAIR.corrupt)
    assert [i for i, t in enumerate(p.clean) if t.unknown] == [4]
    assert "' wentt'" in p.warning and "vocabulary" in p.warning


def test_pickers_start_from_the_top_predictions(model):
    ctl = WorkbenchController(model)
    clean_top = ctl.predictions(PAIR.clean)
    logits = reference(model, RESID, [])[0]["clean"]
    assert clean_top[0][0] == model.tokenizer.decode([int(logits.argmax())])
    assert_close(clean_top[0][1], torch.softmax(logits, -1).max())
    # The trained model gets IOI right, so its top predictions are the task's answer and wrong.
    assert ctl.suggest(PAIR.clean, PAIR.corrupt) == (PAIR.answer, PAIR.wrong)


def test_pairs_are_read_from_tasks_tuples_and_dicts(model):
    ctl = WorkbenchController(model, nnpatch.tasks.ioi(2))
    assert ctl.pairs[0]["answer"] == nnpatch.tasks.ioi(2)[0].answer
    ctl = WorkbenchController(model, [("a b", "a c"), {"clean": "x", "corrupt": "y", "wrong": " z"}])
    assert ctl.pairs == [{"clean": "a b", "corrupt": "a c", "answer": "", "wrong": ""},
                         {"clean": "x", "corrupt": "y", "answer": "", "wrong": " z"}]
    with pytest.raises(NNPatchError, match="pair 0"):
        WorkbenchController(model, [42])


# -- bad input: errors that say what to do ---------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    (dict(clean=""), "clean prompt is empty"),
    (dict(corrupt="   "), "corrupt prompt is empty"),
    (dict(clean=PAIR.clean.replace(" went", " wentt")), "does not know"),
    (dict(corrupt=PAIR.corrupt + " Mary"), "differ in length"),
    (dict(answer=" Maryx"), "not in the model's vocabulary"),
    (dict(answer=" Mary Mary"), "is 2 tokens"),
    (dict(wrong=""), "wrong token is empty"),
    (dict(wrong=PAIR.answer), "both"),
    (dict(site="resid_pree"), "did you mean 'resid_pre'"),
    (dict(site="head_out"), "cannot be swept by layer × pos"),
])
def test_bad_settings_raise_a_helpful_error(model, change, match):
    ctl = WorkbenchController(model)
    settings = Settings(**{**RESID.__dict__, **change})
    with pytest.raises(NNPatchError, match=match):
        ctl.run(settings)
    assert ctl.result is None


def test_cells_need_a_run_and_a_selection(model, ran):
    with pytest.raises(NNPatchError, match="click Run"):
        WorkbenchController(model).inspect((0, 0))
    ctl, _ = ran["resid"]
    with pytest.raises(NNPatchError, match="outside the heatmap"):
        ctl.inspect((4, 0))
    ctl.clear_selection()
    with pytest.raises(NNPatchError, match="no cells are selected"):
        ctl.patch_selected()


class _NoSites(torch.nn.Module):
    """A language model of an architecture nnpatch has no standard sites for."""

    def __init__(self, vocab):
        super().__init__()
        self.embed, self.out = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.out(self.embed(input_ids))})()


def test_model_without_standard_sites_says_so(model):
    ctl = WorkbenchController(nnpatch.LanguageModel(_NoSites(200), tokenizer=model.tokenizer))
    with pytest.raises(NNPatchError, match="no standard sites"):
        ctl.site_names()
    with pytest.raises(NNPatchError, match="no standard sites"):
        ctl.run(RESID)
    assert ctl.predictions(PAIR.clean)  # the rest of the app still works


# -- the widget turns every error into a message ---------------------------------------------------
def test_workbench_shows_messages_instead_of_raising(model):
    wb = nnpatch.Workbench(model, pairs=nnpatch.tasks.ioi(2, seed=1, template=0))
    c, i = wb.controls, wb.inspector
    assert (c.clean, c.answer, c.wrong) == (PAIR.clean, PAIR.answer, PAIR.wrong)
    for bad in ("", PAIR.clean + " Mary"):
        c.clean = bad
        c.action = {"name": "run", "seq": len(bad)}
        assert c.message and not c.busy and wb.controller.result is None
    c.clean = PAIR.clean
    wb.inspect((0, 0))
    assert "click Run" in i.message
    shown = []
    c.observe(lambda change: shown.append(change["new"]), names="progress")
    c.action = {"name": "run", "seq": -1}
    assert c.message == "" and i.ready and c.summary["cells"] == 4 * len(model.to_tokens(PAIR.clean))
    assert shown[-1] == 1.0 and shown == sorted(shown)  # the Run button's bar filled as runs finished
    wb.inspect((9, 9))
    assert "outside the heatmap" in i.message
    wb.inspect((1, PAIR.meta["s2"]))
    assert i.message == "" and i.detail["cells"] == [[1, PAIR.meta["s2"]]]
    assert_close(i.detail["normalized"], wb.controller.result.values[1, PAIR.meta["s2"]])

    bare = nnpatch.Workbench(nnpatch.LanguageModel(_NoSites(200), tokenizer=model.tokenizer))
    assert "no standard sites" in bare.controls.message
    bare.controls.clean, bare.controls.corrupt = PAIR.clean, PAIR.corrupt
    assert bare.controls.preview["clean"] and bare.controls.answer  # still usable
