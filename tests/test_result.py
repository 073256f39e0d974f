"""PatchingResult files and views: safetensors + JSON round trips, plotly figures, text heatmaps."""
import json

import plotly.graph_objects as go
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import nnpatch
from nnpatch import heatmap
from nnpatch import PatchingResult


def grid(dims=("layer", "pos"), shape=(3, 4), seed=0, **kw):
    torch.manual_seed(seed)
    labels = {"layer": [f"transformer.h.{i}.input" for i in range(shape[0])]}
    if "pos" in dims:
        labels["pos"] = ["When", " Mary", " Mary/John", "\n"][: shape[-1]]
    return PatchingResult(torch.randn(shape), dims, labels, clean_score=2.5, corrupt_score=-0.5,
                          site="resid_pre", **kw)


def test_save_and_load_round_trip_without_pickle(tmp_path):
    r = grid(metric="prob", method="attribution", direction="noise", n_pairs=8, model="gpt2")
    path = tmp_path / "r.safetensors"
    r.save(path)
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file with a JSON header
        assert list(f.keys()) == ["values"]
        meta = json.loads(f.metadata()["nnpatch"])
    assert meta["labels"]["pos"][2] == " Mary/John" and meta["method"] == "attribution"
    back = PatchingResult.load(path)
    assert torch.equal(back.values, r.values)
    for field in ("dims", "labels", "clean_score", "corrupt_score", "metric", "site", "method", "direction",
                  "n_pairs", "layers", "model"):
        assert getattr(back, field) == getattr(r, field), field


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"values": torch.zeros(2)}, str(path))
    with pytest.raises(nnpatch.NNPatchError, match="not a PatchingResult file"):
        PatchingResult.load(path)


def test_shape_and_label_checks():
    with pytest.raises(nnpatch.NNPatchError, match="need 2 dims"):
        PatchingResult(torch.zeros(2, 3), ("layer",), {}, 0.0, 1.0)
    with pytest.raises(nnpatch.NNPatchError, match="2 labels for dim 'pos' of size 3"):
        PatchingResult(torch.zeros(2, 3), ("layer", "pos"), {"pos": ["a", "b"]}, 0.0, 1.0)
    r = grid()
    (cell, value), = r.top(1)
    assert abs(value) == float(r.values.abs().max())
    assert set(cell) == {"layer", "pos"}
    assert "resid_pre" in repr(r) and "layer 3 x pos 4" in repr(r)


def test_heatmap_is_a_centred_diverging_figure(monkeypatch):
    monkeypatch.setattr(go.Figure, "show", lambda *a, **k: pytest.fail("plotting must not show"))
    r = grid()
    fig = r.plot()
    assert isinstance(fig, go.Figure)
    (trace,) = fig.data
    assert trace.type == "heatmap"
    limit = max(1.0, float(r.values.abs().max()))  # logit_diff is stored as the fraction restored
    assert trace.zmin == -trace.zmax == -limit and trace.zmid == 0
    assert trace.colorscale[0][1] != trace.colorscale[-1][1]  # a real two-sided scale
    assert [c[1] for c in trace.colorscale] == [c[1] for c in go.Heatmap(colorscale="RdBu").colorscale]
    assert list(fig.layout.xaxis.ticktext) == ["'When' 0", "' Mary' 1", "' Mary/John' 2", "'\\n' 3"]
    assert list(fig.layout.yaxis.ticktext) == ["L0", "L1", "L2"]
    assert "transformer.h.1.input" in trace.text[1][2] and "Mary/John" in trace.text[1][2]
    assert torch.allclose(torch.tensor(trace.z), r.values)


@pytest.mark.parametrize("dims,shape,rows", [(("layer",), (3,), 1), (("layer", "head"), (3, 4), 3),
                                              (("layer", "head", "pos"), (2, 4, 3), 8)])
def test_every_sweep_shape_draws(dims, shape, rows):
    r = grid(dims, shape)
    fig = heatmap.plot(r)
    assert len(fig.data[0].z) == rows
    assert len(heatmap.text(r).splitlines()) == rows + 2


def test_compare_shares_one_scale_and_scatter_pairs_cells():
    a, b = grid(seed=1, method="attribution"), grid(seed=2)
    fig = heatmap.compare([a, b], titles=["attribution", "activation"])
    assert len(fig.data) == 2 and {t.coloraxis for t in fig.data} == {"coloraxis"}
    limit = max(1.0, float(a.values.abs().max()), float(b.values.abs().max()))
    assert fig.layout.coloraxis.cmin == -limit and fig.layout.coloraxis.cmax == limit
    assert fig.layout.coloraxis.colorbar.title.text == "fraction of clean restored (logit_diff)"
    assert [x.text for x in fig.layout.annotations] == ["attribution", "activation"]

    fig = heatmap.scatter(a, b)
    points = fig.data[1]
    assert list(points.x) == b.values.flatten().tolist() and list(points.y) == a.values.flatten().tolist()
    assert points.text[5].startswith("layer 1, pos ' Mary'<br>activation ")
    with pytest.raises(nnpatch.NNPatchError, match="same cells"):
        heatmap.scatter(a, grid(shape=(2, 4)))


def test_text_heatmap():
    r = PatchingResult(torch.tensor([[0.0, 1.0], [0.25, -0.5]]), ("layer", "pos"), {"pos": ["Mary", " ran"]},
                       clean_score=2.0, corrupt_score=0.5, site="resid_pre")
    lines = heatmap.text(r).splitlines()
    assert lines[0].split() == ["Mary", "ran"]
    assert lines[1].split() == ["L0", "0.00", "1.00"] and lines[2].split() == ["L1", "0.25", "-0.50"]
    assert "clean 2" in lines[3]


def test_a_real_sweep_saves_plots_and_scatters(tmp_path, tok):
    import conftest
    model = nnpatch.LanguageModel(conftest.gpt2(), tokenizer=tok)
    kw = dict(answer="t5", wrong="t6", site="attn_out", progress=False)
    act = nnpatch.activation_patching(model, "t1 t2 t3 t4", "t1 t7 t3 t4", **kw)
    atp = nnpatch.attribution_patching(model, "t1 t2 t3 t4", "t1 t7 t3 t4", **kw)
    assert act.labels["pos"] == ["t1", "t2/t7", "t3", "t4"]
    act.save(tmp_path / "act.safetensors")
    assert torch.equal(PatchingResult.load(tmp_path / "act.safetensors").values, act.values)
    assert isinstance(heatmap.scatter(atp, act), go.Figure)
    assert isinstance(heatmap.compare([act, atp]), go.Figure)


def write(path, header=None, tensors=None):
    metadata = None if header is None else {"nnpatch": header if isinstance(header, str) else json.dumps(header)}
    save_file(tensors or {"values": torch.zeros(2, 3)}, str(path), metadata=metadata)
    return path


def test_load_keeps_what_it_knows_of_a_newer_files_header(tmp_path):
    r = grid()
    r.save(tmp_path / "r.safetensors")
    with safe_open(str(tmp_path / "r.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["nnpatch"])
    meta.update(created_by="nnpatch 9.0", prompts=["a", "b"], seed=3)
    back = PatchingResult.load(write(tmp_path / "newer.safetensors", meta, {"values": r.values}))
    assert torch.equal(back.values, r.values) and back.labels == r.labels and back.site == "resid_pre"


@pytest.mark.parametrize("header, says", [
    ("{not json", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ([1, 2], "unknown PatchingResult format"),
    ({"format": "nnpatch.PatchingResult/7", "dims": ["layer"]}, "unknown PatchingResult format"),
    ({"format": "nnpatch.PatchingResult/1", "dims": ["layer", "pos"]}, "lacks labels, clean_score"),
    ({"format": "nnpatch.PatchingResult/1", "dims": "layer", "labels": {}, "clean_score": 1,
      "corrupt_score": 0}, "dims in the nnpatch header is str, expected list"),
    ({"format": "nnpatch.PatchingResult/1", "dims": ["layer", "pos"], "labels": {"pos": [1, 2, 3]},
      "clean_score": 1, "corrupt_score": 0}, "labels in the nnpatch header must be lists of strings"),
    ({"format": "nnpatch.PatchingResult/1", "dims": ["layer", "pos"], "labels": {}, "clean_score": "high",
      "corrupt_score": 0}, "clean_score in the nnpatch header is str, expected a number"),
    ({"format": "nnpatch.PatchingResult/1", "dims": ["layer"], "labels": {}, "clean_score": 1,
      "corrupt_score": 0}, "need 2 dims"),
])
def test_a_malformed_header_is_one_clear_error(tmp_path, header, says):
    path = write(tmp_path / "bad.safetensors", header)
    with pytest.raises(nnpatch.NNPatchError, match=says):
        PatchingResult.load(path)


def test_a_file_that_is_not_safetensors_is_one_clear_error(tmp_path):
    for i, content in enumerate([b"", b"hello world", b"\xff" * 8 + b"{}", (10**6).to_bytes(8, "little") + b"{"]):
        path = tmp_path / f"junk{i}.safetensors"
        path.write_bytes(content)
        with pytest.raises(nnpatch.NNPatchError, match="not a PatchingResult file"):
            PatchingResult.load(path)
    with pytest.raises(FileNotFoundError):
        PatchingResult.load(tmp_path / "missing.safetensors")
