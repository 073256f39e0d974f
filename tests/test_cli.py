"""The `nnpatch` command, with the bundled-model loader and task pairs swapped for tiny ones."""
import sys
import types

import pytest
import torch

import conftest
import nnpatch
from nnpatch import cli
from nnpatch import PatchingResult


class Pairs:
    clean = ["t1 t2 t3 t4 t5", "t8 t2 t3 t4 t9"]
    corrupt = ["t1 t7 t3 t4 t5", "t8 t6 t3 t4 t9"]
    answer = ["t5", "t10"]
    wrong = ["t6", "t11"]


@pytest.fixture
def tiny(monkeypatch, tok):
    loaded = []

    def load(name):
        loaded.append(name)
        return nnpatch.LanguageModel(conftest.gpt2(), tokenizer=tok)

    monkeypatch.setattr(nnpatch.models, "load", load)
    monkeypatch.setattr(nnpatch.tasks, "ioi", lambda n, **kw: Pairs())
    return loaded


def test_sweep_prints_a_heatmap_and_writes_html(tiny, tmp_path, capsys):
    out, saved = tmp_path / "r.html", tmp_path / "r.safetensors"
    assert cli.main(["sweep", "--out", str(out), "--save", str(saved)]) == 0
    assert tiny == ["ioi"]
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split() == ["t1", "t2/t7", "t3", "t4", "t5"]
    assert [line.split()[0] for line in lines[1:4]] == ["L0", "L1", "L2"]
    assert "Activation patching of resid_pre" in text and f"wrote {out}" in text
    html = out.read_text()
    assert "plotly" in html and ("t2\\u002ft7" in html or "t2/t7" in html)  # newer plotly escapes "/"
    result = PatchingResult.load(saved)
    want = nnpatch.activation_patching(nnpatch.models.load("ioi"), Pairs(), progress=False)
    assert torch.allclose(result.values, want.values, atol=1e-5)


def test_sweep_on_given_prompts_with_options(tiny, tmp_path, capsys):
    args = ["sweep", "--clean", "t1 t2 t3", "--corrupt", "t1 t4 t3", "--answer", "t5", "--wrong", "t6",
            "--site", "head_out", "--by", "layer,head", "--attribution", "--out", str(tmp_path / "h.html")]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["H0", "H1", "H2", "H3"]
    assert "Attribution patching of head_out by layer x head" in lines[4]


def test_sweep_errors_are_one_line(tiny, capsys):
    assert cli.main(["sweep", "--clean", "t1 t2"]) == 2
    assert "give both --clean and --corrupt" in capsys.readouterr().err
    assert cli.main(["sweep", "--site", "resid_middle"]) == 2
    assert "Available sites" in capsys.readouterr().err
    assert cli.main(["sweep", "--model", "other"]) == 2
    assert "no default prompt pairs" in capsys.readouterr().err


def test_lab_opens_jupyterlab_on_the_notebooks(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setitem(sys.modules, "jupyterlab", types.ModuleType("jupyterlab"))
    assert cli.main(["lab", "--dir", str(tmp_path)]) == 0
    assert calls == [[sys.executable, "-m", "jupyterlab", f"--notebook-dir={tmp_path}"]]
    assert cli.main(["lab", "--dir", str(tmp_path / "missing")]) == 2


def test_the_readmes_main_job_as_installed(tmp_path):
    """`nnpatch sweep` as the README's first command runs it: the console script, the bundled
    IOI model, its default pairs. The heatmap it prints is the API's."""
    import shutil
    import subprocess
    command = shutil.which("nnpatch")
    if command is None:
        import os
        if os.environ.get("CI"):
            pytest.fail("the nnpatch console script is not installed; scripts/install.sh installs it")
        pytest.skip("the nnpatch console script is not installed (pip install -e .)")
    out = tmp_path / "results.html"
    run = subprocess.run([command, "sweep", "--out", str(out), "--save", str(tmp_path / "r.safetensors")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert out.stat().st_size > 100_000 and "wrote" in run.stdout
    saved = PatchingResult.load(tmp_path / "r.safetensors")
    model = nnpatch.models.load("ioi")
    want = nnpatch.activation_patching(model, nnpatch.tasks.ioi(8, template=0), progress=False)
    assert torch.allclose(saved.values, want.values, atol=1e-5)
    assert "L0" in run.stdout and "L3" in run.stdout


def test_unwritable_outputs_fail_before_any_work(tiny, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    for option, path in [("--out", tmp_path / "no-folder" / "r.html"), ("--out", tmp_path),
                         ("--save", tmp_path / "a-file" / "r.safetensors")]:
        assert cli.main(["sweep", option, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"nnpatch sweep: error: ") and option in err, err
    assert tiny == []                                   # no model was loaded, nothing computed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_quiet_and_the_bar_counts_the_runs_done(tiny, tmp_path, capfd):
    assert cli.main(["sweep", "--out", str(tmp_path / "r.html")]) == 0
    err = capfd.readouterr().err
    bar = err.replace("\r", "\n").strip().splitlines()[-1]
    done, total = bar.split("|")[2].split()[0].split("/")
    assert done == total and bar.startswith("patching resid_pre: 100%") and err.endswith("\n"), err
    assert cli.main(["sweep", "--quiet", "--out", str(tmp_path / "r.html")]) == 0
    assert capfd.readouterr().err == ""


def test_help_version_and_python_dash_m():
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    def run(*args):
        done = subprocess.run([sys.executable, "-m", "nnpatch", *args], capture_output=True, text=True, cwd=root)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        return done.stdout
    assert run("--version").startswith("nnpatch ")
    top = run("--help")
    assert "nnpatch sweep" in top and "nnpatch lab" in top and "%load_ext nnpatch" in top
    sweep = run("sweep", "--help")
    assert "--quiet" in sweep and "examples:" in sweep and "table-max" in sweep and "head_out" in sweep
    assert "notebooks" in run("lab", "--help")
