"""Figures that do not mislead: every metric drawn as the fraction of clean restored on one scale
centred at 0 (raw values on hover), index-labelled and thinned ticks, the container's width, no
plotly logo or cloud button, light and dark themes."""
import math
import re
import warnings

import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

import nnpatch
from nnpatch import heatmap, PatchingResult
from nnpatch.jupyter import circuit_plot, figures

RAW = torch.tensor([[0.2, 1.4, -0.3], [2.0, 0.5, 0.9]])  # a metric's raw values, [layer, pos]
CLEAN, CORRUPT = 1.7, 0.2
TOKENS = ["When", " Mary", " to"]


def result(metric="prob", raw=RAW, clean=CLEAN, corrupt=CORRUPT, **kw):
    """A result as a sweep stores it: normalised metrics hold (raw - corrupt) / (clean - corrupt)."""
    stored = (raw - corrupt) / (clean - corrupt) if metric == "logit_diff" else raw
    return PatchingResult(stored, ("layer", "pos"), {"pos": TOKENS[: raw.shape[1]]}, clean_score=clean,
                          corrupt_score=corrupt, metric=metric, site="resid_pre", **kw)


def hand_fraction(raw=RAW, clean=CLEAN, corrupt=CORRUPT):
    return [[(v - corrupt) / (clean - corrupt) for v in row] for row in raw.tolist()]


@pytest.mark.parametrize("metric", ["logit_diff", "logit_diff_raw", "prob", "kl"])
def test_every_metric_is_drawn_as_the_fraction_restored_with_raw_values_on_hover(metric):
    fig = heatmap.plot(result(metric))
    (trace,) = fig.data
    want = hand_fraction()
    for got_row, want_row in zip(trace.z, want):
        assert got_row == pytest.approx(want_row, abs=1e-5)
    top = max(abs(v) for row in want for v in row)
    assert top > 1  # so the range below is the data's, not the [-1, 1] floor
    assert trace.zmid == 0 and trace.zmin == pytest.approx(-top, abs=1e-5) and trace.zmax == -trace.zmin
    assert trace.colorbar.title.text == f"fraction of clean restored ({metric})"
    for i, row in enumerate(RAW.tolist()):
        for j, raw in enumerate(row):
            shown = dict(re.findall(r"(restored|" + metric + r") (\S+)", trace.text[i][j].replace("<br>", " ")))
            assert float(shown["restored"]) == pytest.approx(want[i][j], abs=5e-4)
            assert float(shown[metric]) == pytest.approx(raw, rel=1e-3)
    assert trace.customdata[1][0] == pytest.approx(2.0, abs=1e-5)  # raw values, for tools
    assert trace.hovertemplate == "%{text}<extra></extra>"


def test_small_fractions_still_span_minus_one_to_one():
    fig = heatmap.plot(result("prob", raw=torch.tensor([[0.25, 0.3]]), clean=1.2, corrupt=0.2))
    assert (fig.data[0].zmin, fig.data[0].zmid, fig.data[0].zmax) == (-1.0, 0.0, 1.0)


def test_raw_and_restored_undo_each_other():
    r = result("logit_diff")
    assert torch.allclose(r.raw(), RAW, atol=1e-5)
    assert torch.allclose(r.restored(), torch.tensor(hand_fraction()), atol=1e-5)
    assert torch.allclose(result("prob").restored(), torch.tensor(hand_fraction()), atol=1e-5)
    assert torch.equal(result("prob").raw(), RAW)


def test_a_real_sweep_draws_the_same_fraction_for_normalised_and_raw_logit_diff():
    model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(4, template=0)
    norm = nnpatch.activation_patching(model, pairs, site="attn_out", progress=False)
    raw = nnpatch.activation_patching(model, pairs, site="attn_out", metric="logit_diff_raw", progress=False)
    a, b = heatmap.plot(norm).data[0], heatmap.plot(raw).data[0]
    assert torch.allclose(torch.tensor(a.z), torch.tensor(b.z), atol=1e-4)
    assert torch.allclose(torch.tensor(a.customdata), raw.values, atol=1e-4)  # raw units, on hover
    want = (raw.values - raw.corrupt_score) / (raw.clean_score - raw.corrupt_score)
    assert torch.allclose(torch.tensor(b.z), want, atol=1e-6)
    assert abs(raw.clean_score - raw.corrupt_score) > 0.5  # a real span: the check above could fail


def test_equal_clean_and_corrupt_show_raw_values_and_say_why():
    flat = result("prob", clean=0.4, corrupt=0.4)
    fig = heatmap.plot(flat)
    trace = fig.data[0]
    assert torch.allclose(torch.tensor(trace.z), RAW)  # raw values, not inf or NaN colours
    assert trace.zmid == pytest.approx(0.4) and trace.zmax - 0.4 == pytest.approx(0.4 - trace.zmin)
    assert "undefined" in fig.layout.title.text and "raw" in trace.colorbar.title.text
    assert "fraction" not in trace.text[0][0]
    assert "undefined" in heatmap.plot(flat, title="my sweep").layout.title.text  # a title keeps the warning
    assert flat.span_defined is False and torch.isnan(flat.restored()).all()


def test_equal_scores_of_a_normalised_metric_leave_blank_cells_and_a_fix():
    stored = torch.tensor([[float("inf"), float("nan"), float("-inf")]])  # what (v - c) / 0 gives
    r = PatchingResult(stored, ("layer", "pos"), {}, clean_score=1.0, corrupt_score=1.0)
    fig = heatmap.plot(r)
    assert [list(row) for row in fig.data[0].z] == [[None, None, None]]
    assert "metric='logit_diff_raw'" in fig.layout.title.text
    assert fig.to_json()  # valid JSON: no inf or NaN left for plotly to colour


def test_compare_leaves_a_result_without_a_fraction_blank_and_says_so():
    fine, flat = result("prob"), result("prob", clean=0.4, corrupt=0.4)
    fig = heatmap.compare([fine, flat], titles=["fine", "flat"])
    assert all(v is None for row in fig.data[1].z for v in row)
    assert torch.allclose(torch.tensor(fig.data[0].z), torch.tensor(hand_fraction()), atol=1e-5)
    assert [a.text for a in fig.layout.annotations] == ["fine", "flat (undefined: clean = corrupt)"]
    assert fig.layout.coloraxis.cmid == 0 and fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax


def test_a_tiny_span_of_a_normalised_metric_recovers_the_raw_values():
    r = result("logit_diff", clean=0.2 + 1e-9, corrupt=0.2)
    assert not r.span_defined
    assert torch.allclose(torch.tensor(heatmap.plot(r).data[0].z), RAW, atol=1e-3)


def test_an_undefined_cell_is_blank_and_counted():
    raw = RAW.clone()
    raw[0, 1] = float("nan")
    fig = heatmap.plot(result("prob", raw=raw))
    assert fig.data[0].z[0][1] is None and "undefined" in fig.data[0].text[0][1]
    assert "1 cell(s) undefined" in fig.layout.title.text


def test_position_labels_carry_their_index_and_thin_out():
    n = 100
    tokens = [f" w{i}" for i in range(n)]
    r = PatchingResult(torch.randn(2, n), ("layer", "pos"), {"pos": tokens}, 2.0, 0.5)
    x = heatmap.plot(r).layout.xaxis
    k = math.ceil(n / heatmap.MAX_TICKS)
    assert list(x.tickvals) == list(range(0, n, k)) + [n - 1]  # 96, then the last position
    x = heatmap.plot(PatchingResult(torch.randn(2, n - 2), ("layer", "pos"), {"pos": tokens[:-2]}, 2, 0.5)).layout.xaxis
    assert list(x.tickvals) == list(range(0, n - 4, k)) + [n - 3]  # not 96 beside 97: they would overlap
    assert list(x.ticktext) == [f"' w{i}' {i}" for i in x.tickvals]
    small = heatmap.plot(result("prob")).layout.xaxis
    assert list(small.tickvals) == [0, 1, 2] and list(small.ticktext) == ["'When' 0", "' Mary' 1", "' to' 2"]


def test_layer_head_pos_rows_are_layer_dot_head():
    values = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 3, 4) / 24
    r = PatchingResult(values, ("layer", "head", "pos"), {"pos": ["a", "b", "c", "d"]}, 1.0, 0.0, site="head_out")
    fig = heatmap.plot(r)
    assert list(fig.layout.yaxis.ticktext) == [f"L{i}.H{h}" for i in range(2) for h in range(3)]
    z = fig.data[0].z
    for i in range(2):
        for h in range(3):
            assert z[3 * i + h] == pytest.approx(values[i, h].tolist())
    assert "layer 1 head 2" in fig.data[0].text[5][0]


def figures_to_check():
    a, b = result("prob"), result("prob", raw=RAW * 0.5)
    yield heatmap.plot(a)
    yield heatmap.compare([a, b])
    yield heatmap.scatter(a, b)


def test_figures_follow_the_container_width():
    for fig in figures_to_check():
        assert fig.layout.width is None and fig.layout.autosize is True
        assert 300 <= fig.layout.height <= 1200


def every_nnpatch_figure(theme=None):
    """One of each kind of figure nnpatch draws, with a title where the kind has one."""
    from nnpatch.jupyter import inspect_plots
    from nnpatch.jupyter.runs import as_grid
    model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(4, template=0)
    a, b = result("prob"), result("prob", raw=RAW * 0.5)
    yield "plot", heatmap.plot(a, theme=theme)
    yield "compare", heatmap.compare([a, b], theme=theme)
    yield "scatter", heatmap.scatter(a, b, theme=theme)
    yield "pairs", as_grid(heatmap.compare([a, b] * 3, theme=theme), 6)
    pattern = nnpatch.attention_pattern(model, pairs.clean[0], 2, 1)
    yield "attention", inspect_plots.attention([pattern, pattern], theme=theme)
    yield "logit_attribution", inspect_plots.logit_attribution(torch.randn(4, 4), theme=theme)
    yield "logit_lens", inspect_plots.logit_lens(nnpatch.logit_lens(model, pairs.clean[0]), theme=theme)
    yield "graph", circuit_plot.graph(nnpatch.edge_attribution(model, pairs).top(10), theme=theme)
    yield "heads", circuit_plot.heads(nnpatch.path_patching(model, pairs, receivers=["a3.h0<q>"]), theme=theme)


@pytest.mark.parametrize("theme", [None, "none"])  # "none": plotly's template that sets no automargin
def test_every_figure_keeps_its_labels_inside_and_its_title_below_the_modebar(theme):
    """Rotated position labels reach left and down past the plot: every axis pushes the margins
    to hold its labels. The modebar's buttons sit at the figure's top right: the title hangs
    below them (and pushes the top margin down for itself), whatever the width."""
    for name, fig in every_nnpatch_figure(theme):
        axes = [k for k in fig.layout if re.fullmatch(r"[xy]axis\d*", k)]
        assert {"xaxis", "yaxis"} <= set(axes), name
        for k in axes:
            assert fig.layout[k].automargin is True, (name, k)
        title = fig.layout.title
        assert (title.yref, title.y, title.yanchor, title.automargin) == ("container", 1, "top", True), name
        assert title.pad.t == figures.MODEBAR_PX >= 30, name
        if name not in ("compare", "pairs", "attention", "logit_lens"):  # those title each subplot instead
            assert title.text, name


def test_small_multiples_label_few_positions_upright():
    """Each pair's small heatmap labels at most GRID_TICKS positions, the last always, written
    downwards (slanted ones run under the left neighbour's); a lone heatmap keeps its labels."""
    from nnpatch.jupyter import runs
    tokens = [f" t{i}" for i in range(14)]
    r = PatchingResult(torch.randn(2, 14), ("layer", "pos"), {"pos": tokens}, 2.0, 0.5)
    for n in (2, 6):
        fig = runs.as_grid(heatmap.compare([r] * n), n)
        for k in range(n):
            x = fig.layout[f"xaxis{k + 1 if k else ''}"]
            assert list(x.tickvals) == [0, 3, 6, 9, 13] and x.tickangle == 90, (n, k)  # not 12 beside 13
            assert list(x.ticktext) == [f"' t{i}' {i}" for i in x.tickvals]
    lone = runs.as_grid(heatmap.compare([r]), 1).layout.xaxis
    assert list(lone.tickvals) == list(range(14)) and lone.tickangle == -45
    heads = PatchingResult(torch.randn(2, 3), ("layer", "head"), {"head": [0, 1, 2]}, 2.0, 0.5)
    x = runs.as_grid(heatmap.compare([heads] * 2), 2).layout.xaxis2
    assert list(x.ticktext) == ["H0", "H1", "H2"] and x.tickangle == 0  # upright already


def test_circuit_figures_use_the_same_scale_and_display():
    model, pairs = nnpatch.models.load("ioi"), nnpatch.tasks.ioi(4, template=0)
    pp = nnpatch.path_patching(model, pairs, receivers=["a3.h0<q>", "a3.h1<q>"])
    fig = circuit_plot.heads(pp)
    trace = fig.data[0]
    want = (pp.scores - pp.corrupt_score) / (pp.clean_score - pp.corrupt_score)
    grid = pp.heads(want)
    for i in range(4):
        for h in range(4):
            v = grid[i, h].item()
            assert (trace.z[i][h] is None) if math.isnan(v) else trace.z[i][h] == pytest.approx(v, abs=1e-6)
    assert trace.zmid == 0 and trace.zmin == -trace.zmax and trace.zmax >= 1
    assert trace.colorbar.title.text == "fraction of clean kept (logit_diff)"
    cell = next((i, h) for i in range(4) for h in range(4) if not math.isnan(grid[i, h].item()))
    raw = pp.heads(pp.scores)[cell].item()
    assert f"logit_diff {raw:.4g}" in trace.text[cell[0]][cell[1]]
    graph = circuit_plot.graph(nnpatch.edge_attribution(model, pairs).top(10))
    for f in (fig, graph):
        assert isinstance(f, figures.Figure) and f.layout.width is None and f.layout.autosize is True
    assert circuit_plot.CONFIG is heatmap.CONFIG


def test_config_is_accepted_by_plotly_and_drops_the_logo_and_cloud_buttons(monkeypatch):
    from plotly.offline.offline import _get_jconfig
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plotly warns on config keys it does not know
        assert _get_jconfig(heatmap.CONFIG) == heatmap.CONFIG
    assert heatmap.CONFIG["displaylogo"] is False and "sendDataToCloud" in heatmap.CONFIG["modeBarButtonsToRemove"]
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    for fig in figures_to_check():
        assert isinstance(fig, figures.Figure)
        assert "sendDataToCloud" in fig.layout.modebar.remove
        bundle = fig._repr_mimebundle_()  # what a notebook saves
        assert bundle["application/vnd.plotly.v1+json"]["config"]["displaylogo"] is False
        assert '"displaylogo": false' in fig.to_html(include_plotlyjs=False)
    shown = []
    monkeypatch.setattr(pio, "show", lambda fig, **kw: shown.append(kw.get("config")))
    heatmap.plot(result())._ipython_display_()
    assert shown == [heatmap.CONFIG]
    monkeypatch.setattr(go.Figure, "show", lambda self, *a, **kw: shown.append(kw.get("config")))
    heatmap.plot(result()).show(config={"scrollZoom": True})
    assert shown[-1] == {**heatmap.CONFIG, "scrollZoom": True}


def test_themes(monkeypatch, tmp_path):
    dark = heatmap.plot(result(), theme="dark").layout.template.layout
    light = heatmap.plot(result(), theme="light").layout.template.layout
    assert dark.paper_bgcolor == dark.plot_bgcolor == "rgba(0,0,0,0)"
    assert dark.font.color == pio.templates["plotly_dark"].layout.font.color != light.font.color
    try:
        heatmap.set_theme("dark")
        assert heatmap.plot(result()).layout.template.layout.font.color == dark.font.color
        assert heatmap.compare([result()]).layout.template.layout.font.color == dark.font.color
        assert heatmap.plot(result(), theme="light").layout.template.layout.font.color == light.font.color
    finally:
        heatmap.set_theme("auto")
    with pytest.raises(nnpatch.NNPatchError, match="theme 'drak' is unknown; use one of auto, light, dark"):
        heatmap.set_theme("drak")
    # "auto" reads JupyterLab's saved theme setting
    settings = tmp_path / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    monkeypatch.setenv("JUPYTERLAB_SETTINGS_DIR", str(tmp_path))
    (settings / "themes.jupyterlab-settings").write_text('{\n  // "theme": "JupyterLab Light",\n'
                                                        '  "theme": "JupyterLab Dark"\n}\n')
    assert heatmap.plot(result()).layout.template.layout.font.color == dark.font.color
    (settings / "themes.jupyterlab-settings").write_text('{\n  "theme": "JupyterLab Light"\n}\n')
    assert heatmap.plot(result()).layout.template.layout.font.color == light.font.color
