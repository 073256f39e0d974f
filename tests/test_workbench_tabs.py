"""The workbench's Head, Logit lens, Noise and Sites tabs, driven through a fake workbench (the
add_tab / on_run / on_inspect contract) with a real WorkbenchController: each panel's numbers and
figures equal the public API's and the plain-PyTorch references of test_inspect / test_noise."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

import nnpatch
from nnpatch.jupyter import workbench_tabs
from nnpatch.jupyter.controller import Settings, WorkbenchController
from test_inspect import CLEAN, CORRUPT, check_lens, dla_by_hand, gpt2_pattern, lens_by_hand, llama_pattern, tokens
from test_noise import grid, reference


@pytest.fixture(scope="module")
def ioi():
    return nnpatch.models.load("ioi")


def fake_workbench(model, pairs=None):
    wb = SimpleNamespace(controller=WorkbenchController(model, pairs), tabs={}, inspects=[], runs=[])
    wb.add_tab = lambda title, widget: wb.tabs.__setitem__(title, widget)
    wb.on_inspect = wb.inspects.append
    wb.on_run = wb.runs.append
    return wb


def run(wb, settings):
    wb.controller.run(settings)
    for callback in wb.runs:
        callback()


def inspect(wb, cell):
    wb.controller.inspect(cell)
    for callback in wb.inspects:
        callback(cell, wb.controller.settings)


HEADS = Settings(CLEAN, CORRUPT, " Mary", " John", site="head_out", by=("layer", "head"))
POSITIONS = Settings(CLEAN, CORRUPT, " Mary", " John")


def test_add_all_registers_four_tabs_and_two_callbacks(ioi):
    wb = fake_workbench(ioi)
    panels = workbench_tabs.add_all(wb)
    assert list(wb.tabs) == ["Head", "Logit lens", "Noise", "Sites"] and wb.tabs == panels
    assert len(wb.inspects) == 1 and len(wb.runs) == 1


def test_head_tab_shows_the_heads_pattern_and_attribution(ioi):
    wb = fake_workbench(ioi)
    panel = workbench_tabs.add_all(wb)["Head"]
    run(wb, HEADS)
    inspect(wb, (2, 1))
    view = panel.view
    assert (view.layer, view.head) == (2, 1) and panel.last_error is None
    for prompt, pattern, trace in ((CLEAN, view.clean, 0), (CORRUPT, view.corrupt, 1)):
        by_hand = gpt2_pattern(ioi.module, 2, 1, tokens(ioi, prompt))
        assert torch.allclose(pattern.weights, by_hand, atol=1e-5)
        z = panel.patterns.data[trace].z
        assert [z[q][k] for q in range(14) for k in range(q + 1)] == \
            pytest.approx([float(by_hand[q, k]) for q in range(14) for k in range(q + 1)], abs=1e-5)
        assert all(z[q][k] is None for q in range(14) for k in range(q + 1, 14))  # blank above the diagonal
    assert panel.patterns.data[0].y[9] == "' John' 9" and panel.patterns.data[1].y[9] == "' Mary' 9"
    heads, _, _ = dla_by_hand(ioi, CLEAN, " Mary", " John")
    assert torch.allclose(torch.tensor(panel.dla.data[0].z), heads, atol=1e-5)
    corrupt_heads, _, _ = dla_by_hand(ioi, CORRUPT, " Mary", " John")
    assert f"{float(heads[2, 1]):+.3f} on the clean run" in panel.note.value
    assert f"{float(corrupt_heads[2, 1]):+.3f} on the corrupt run" in panel.note.value


def test_head_tab_takes_layer_head_pos_cells_and_explains_position_cells(ioi):
    wb = fake_workbench(ioi)
    panel = workbench_tabs.add_all(wb)["Head"]
    run(wb, POSITIONS)
    inspect(wb, (1, 3))
    assert panel.view is None and "layer × head" in panel.note.value
    for callback in wb.inspects:  # a (layer, head, pos) cell, as the Cells selector offers
        callback((3, 2, 13), dataclasses.replace(HEADS, by=("layer", "head", "pos")))
    assert (panel.view.layer, panel.view.head) == (3, 2)
    assert torch.equal(panel.view.clean.weights, nnpatch.attention_pattern(ioi, CLEAN, 3, 2).weights)


def test_head_tab_reports_errors_in_its_note(ioi):
    wb = fake_workbench(ioi)
    panel = workbench_tabs.add_all(wb)["Head"]
    panel.inspected((7, 0), HEADS)
    assert "layer 7 is out of range" in panel.note.value and panel.last_error is None


def test_lens_tab_shows_clean_corrupt_and_the_patched_cell(ioi):
    wb = fake_workbench(ioi)
    panel = workbench_tabs.add_all(wb)["Logit lens"]
    run(wb, POSITIONS)
    assert list(panel.view) == ["clean", "corrupt"] and len(panel.figure.data) == 2
    mary = ioi.to_tokens(" Mary")[0]
    for name, prompt in (("clean", CLEAN), ("corrupt", CORRUPT)):
        probs, _ = lens_by_hand(ioi, tokens(ioi, prompt))
        check_lens(panel.view[name], probs, mary, ioi.tokenizer.decode)
    inspect(wb, (2, 13))
    block = ioi.module.transformer.h[2]
    clean_in = {}
    lens_by_hand(ioi, tokens(ioi, CLEAN), [lambda: block.register_forward_pre_hook(
        lambda m, a, k: clean_in.__setitem__("v", a[0][0].clone()), with_kwargs=True)])

    def write():
        def pre(m, a, k):
            x = a[0].clone()
            x[0, 13] = clean_in["v"][13]
            return (x,) + a[1:], k
        return block.register_forward_pre_hook(pre, with_kwargs=True)
    probs, _ = lens_by_hand(ioi, tokens(ioi, CORRUPT), [write])
    patched = panel.view["patched"]
    check_lens(patched, probs, mary, ioi.tokenizer.decode)
    trace = panel.figure.data[2]
    assert [list(r) for r in trace.text] == [[repr(t)[1:-1] for t in row] for row in patched.top_tokens]
    assert torch.allclose(torch.tensor(trace.z), probs[..., mary], atol=1e-5)  # colour: the answer's probability
    assert float(probs[-1, -1, mary]) > 0.5 > float(panel.view["corrupt"].answer_probs[-1, -1])


def test_noise_tab_equals_noise_patching_and_the_hand_loop(ioi):
    wb = fake_workbench(ioi)
    panel = workbench_tabs.add_all(wb)["Noise"]
    assert panel.scale.value == pytest.approx(3 * float(ioi.module.transformer.wte.weight.detach().std()), abs=1e-4)
    run(wb, POSITIONS)
    assert panel.subject.value == "9" and "' John' 9" in panel.note.value
    panel.scale.value = 0.5
    panel.run()
    result = panel.view
    api = nnpatch.noise_patching(ioi, CLEAN, subject=[9], noise=0.5, answer=" Mary", wrong=" John", progress=False)
    assert torch.equal(result.values, api.values) and result.noise == 0.5
    blocks = ioi.module.transformer.h
    values, *_ = reference(ioi, [CLEAN], [[9]], 0.5, 0, lambda layer: (blocks[layer], "input"),
                           grid((4, 14), ("layer", "pos")), "denoise", " Mary", " John")
    assert torch.allclose(result.values.flatten(), values.float(), atol=2e-4)
    assert torch.allclose(torch.tensor(panel.figure.data[0].z), result.values)
    assert torch.allclose(torch.tensor(panel.figure.data[1].z), wb.controller.result.values)  # beside the last run
    assert "Noise std 0.5 on tokens [9]" in panel.note.value
    panel.mode.value = "noise"
    panel.run()
    assert panel.view.direction == "noise"
    panel.subject.value = "nine"
    panel.run()
    assert "give token positions" in panel.note.value and panel.last_error is None


def test_sites_tab_sweeps_three_sites_like_the_api(ioi):
    wb = fake_workbench(ioi)
    panel = workbench_tabs.add_all(wb)["Sites"]
    run(wb, POSITIONS)
    assert list(panel.view) == ["resid_pre", "attn_out", "mlp_out"]
    assert panel.view["resid_pre"] is wb.controller.result  # the run itself, not swept twice
    for i, site in enumerate(["resid_pre", "attn_out", "mlp_out"]):
        api = nnpatch.activation_patching(ioi, CLEAN, CORRUPT, answer=" Mary", wrong=" John", site=site, progress=False)
        assert torch.allclose(panel.view[site].values, api.values, atol=1e-5)
        assert torch.allclose(torch.tensor(panel.figure.data[i].z), api.values, atol=1e-5)
    run(wb, HEADS)  # a run by head: the sites go by layer x pos
    assert panel.view["resid_pre"].dims == ("layer", "pos")


def test_table_max_tabs_equal_the_llama_references():
    model = nnpatch.models.load("table-max")
    pair = nnpatch.tasks.table_max(1)[0]
    wb = fake_workbench(model, [pair])
    panels = workbench_tabs.add_all(wb)
    run(wb, Settings(pair.clean, pair.corrupt, pair.answer, pair.wrong, site="head_out", by=("layer", "head")))
    inspect(wb, (0, 1))
    head = panels["Head"].view
    assert torch.allclose(head.clean.weights, llama_pattern(model.module, 0, 1, tokens(model, pair.clean)), atol=1e-5)
    assert torch.allclose(head.dla_clean, dla_by_hand(model, pair.clean, pair.answer, pair.wrong)[0], atol=1e-5)
    lens = panels["Logit lens"].view
    assert lens["patched"].patch == "head_out (layer 0, head 1) from the source prompt"
    run_ = nnpatch.sweep.patch_cells(model, pair.clean, pair.corrupt, [(0, 1)], site="head_out", by=("layer", "head"),
                                     answer=pair.answer, wrong=pair.wrong)
    assert torch.allclose(lens["patched"].top_probs[-1, -1], run_.patched_logits[0].softmax(-1).max(), atol=1e-5)
    assert all(p.last_error is None for p in panels.values())


def test_tabs_never_keep_numbers_of_an_earlier_run(ioi):
    wb = fake_workbench(ioi)
    panels = workbench_tabs.add_all(wb)
    run(wb, HEADS)
    inspect(wb, (2, 1))
    swapped = dataclasses.replace(HEADS, answer=" John", wrong=" Mary")
    run(wb, swapped)
    assert panels["Head"].view is None and len(panels["Head"].patterns.data) == 0  # the old head is gone
    inspect(wb, (2, 1))
    heads, _, _ = dla_by_hand(ioi, CLEAN, " John", " Mary")
    assert torch.allclose(panels["Head"].view.dla_clean, heads, atol=1e-5)  # not the cached " Mary" one
    other = nnpatch.tasks.ioi(1, seed=3, template=0)[0]
    run(wb, Settings(other.clean, other.corrupt, other.answer, other.wrong))
    probs, _ = lens_by_hand(ioi, tokens(ioi, other.clean))
    check_lens(panels["Logit lens"].view["clean"], probs, ioi.to_tokens(other.answer)[0], ioi.tokenizer.decode)
    assert "patched" not in panels["Logit lens"].view


def test_sites_tab_of_an_all_pairs_run_sweeps_every_pair(ioi):
    pairs = nnpatch.tasks.ioi(3, template=0)
    wb = fake_workbench(ioi, pairs)
    panel = workbench_tabs.add_all(wb)["Sites"]
    first = wb.controller.pairs[0]
    run(wb, Settings(first["clean"], first["corrupt"], first["answer"], first["wrong"], all_pairs=True))
    assert panel.last_error is None and "mean of 3 pairs" in panel.note.value
    assert panel.view["resid_pre"] is wb.controller.result
    api = nnpatch.activation_patching(ioi, pairs, site="mlp_out", progress=False)
    assert torch.allclose(panel.view["mlp_out"].values, api.values, atol=1e-5) and api.n_pairs == 3


def test_one_prompt_tabs_of_an_all_pairs_run_say_which_pair_they_show(ioi):
    pairs = nnpatch.tasks.ioi(3, template=0)
    wb = fake_workbench(ioi, pairs)
    panels = workbench_tabs.add_all(wb)
    first = wb.controller.pairs[0]
    run(wb, Settings(first["clean"], first["corrupt"], first["answer"], first["wrong"], site="head_out",
                     by=("layer", "head"), all_pairs=True))
    inspect(wb, (2, 1))
    panels["Noise"].run()
    said = "mean over 3 pairs; this tab shows one of them: the clean and corrupt prompts in the fields"
    for title in ("Head", "Logit lens", "Noise"):
        assert panels[title].last_error is None and said in panels[title].note.value, title
    assert "this tab shows one" not in panels["Sites"].note.value
    probs, _ = lens_by_hand(ioi, tokens(ioi, first["clean"]))  # what it shows is the first pair's
    check_lens(panels["Logit lens"].view["clean"], probs, ioi.to_tokens(first["answer"])[0], ioi.tokenizer.decode)
    run(wb, dataclasses.replace(wb.controller.settings, all_pairs=False))  # one pair: nothing to say
    inspect(wb, (2, 1))
    assert all("this tab shows one" not in panels[t].note.value for t in ("Head", "Logit lens", "Noise"))


def test_tabs_not_on_screen_compute_when_selected(ioi):
    import ipywidgets
    wb = fake_workbench(ioi)
    wb.tabs = ipywidgets.Tab([ipywidgets.HTML("heatmap")])
    wb.add_tab = lambda title, widget: setattr(wb.tabs, "children", (*wb.tabs.children, widget))
    panels = workbench_tabs.add_all(wb)
    run(wb, HEADS)
    inspect(wb, (2, 1))
    assert panels["Head"].view is None and panels["Logit lens"].view is None and panels["Sites"].view is None
    assert panels["Noise"].subject.value == "9"  # the noise tab fills its subject at once
    wb.tabs.selected_index = 2  # Logit lens
    assert panels["Logit lens"].view["patched"].patch == "head_out (layer 2, head 1) from the source prompt"
    assert panels["Head"].view is None
    wb.tabs.selected_index = 1
    eager = fake_workbench(ioi)
    reference_panels = workbench_tabs.add_all(eager)
    run(eager, HEADS)
    inspect(eager, (2, 1))
    assert torch.equal(panels["Head"].view.dla_clean, reference_panels["Head"].view.dla_clean)
    assert torch.equal(panels["Head"].view.clean.weights, reference_panels["Head"].view.clean.weights)
    inspect(wb, (3, 0))  # on screen: at once
    assert (panels["Head"].view.layer, panels["Head"].view.head) == (3, 0)
    wb.tabs.selected_index = 4
    assert panels["Sites"].view["resid_pre"].site == "resid_pre" and panels["Sites"].pending == (False, None)


def test_plots_show_the_values_they_are_given(ioi):
    from nnpatch.jupyter import inspect_plots
    pattern = nnpatch.attention_pattern(ioi, "When Mary and John", 1, 0)
    fig = inspect_plots.attention([pattern])
    assert list(fig.data[0].x) == ["'When' 0", "' Mary' 1", "' and' 2", "' John' 3"]
    assert fig.data[0].z[1][0] == pytest.approx(float(pattern.weights[1, 0])) and fig.data[0].z[0][1] is None
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1
    dla = torch.tensor([[0.5, -2.0], [1.0, 0.0]])
    fig = inspect_plots.logit_attribution(dla, answer=" Mary", wrong=" John", mark=(1, 0))
    assert torch.equal(torch.tensor(fig.data[0].z), dla) and (fig.data[0].zmin, fig.data[0].zmax) == (-2.0, 2.0)
    assert fig.layout.shapes[0].x0 == -0.5 and fig.layout.shapes[0].y0 == 0.5  # head 0 of layer 1
    lens = nnpatch.logit_lens(ioi, "When Mary and John")  # no answer: colour is the top token's probability
    fig = inspect_plots.logit_lens(lens)
    assert torch.allclose(torch.tensor(fig.data[0].z), lens.top_probs)
    assert fig.layout.coloraxis.colorbar.title.text == "p(top token)" and "p(' Mary')" not in str(fig.layout)
    with pytest.raises(ValueError, match="at least one"):
        inspect_plots.attention([])
    assert inspect_plots.CONFIG["displaylogo"] is False
    dark = inspect_plots.logit_lens(lens, theme="dark")  # the theme every nnpatch figure takes
    assert dark.layout.template.layout.font.color != inspect_plots.logit_lens(lens, theme="light").layout.template.layout.font.color
    assert dark.layout.modebar.remove == ("sendDataToCloud",) and dark.layout.autosize
