"""Distributed sweeps: two CPU processes under torchrun (gloo) give the grid of one process;
a failing rank, mismatched ranks and more ranks than work are errors on every rank, without a
hang (issue 15, item 3). The ranks run tests/distributed_programs.py."""
import os
import re
import pathlib
import subprocess
import sys

import pytest
import torch

import nnpatch
from distributed_programs import CLEAN, CORRUPT, OPTIONS, model

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "distributed_programs.py"), str(out)],
                          capture_output=True, text=True, timeout=240, env=env)  # a hang fails here
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)], out


def one_process(*args, **options):
    return nnpatch.activation_patching(model(), *args, **{**OPTIONS, "progress": False, **options}).values


@pytest.mark.parametrize("name,args,options", [
    ("pairs", (CLEAN, CORRUPT), {}),                          # 5 pairs shared 3 + 2
    ("cells", (CLEAN[0], CORRUPT[0]), {}),                    # 1 pair: 18 cells shared 9 + 9
    ("heads", (CLEAN[:3], CORRUPT[:3]), dict(site="head_out", by=("layer", "head"), metric="kl")),
    ("checkpoint", (CLEAN, CORRUPT), {}),
    ("after_errors", (CLEAN, CORRUPT), {}),
])
def test_two_processes_give_the_grid_of_one(ranks, name, args, options):
    (rank0, rank1), _ = ranks
    want = one_process(*args, **options)
    assert torch.allclose(rank0[name], want, atol=1e-6) and torch.equal(rank0[name], rank1[name])


def test_one_bar_on_rank_0_counts_every_rank_and_ends_at_the_runs_made(ranks):
    (rank0, rank1), _ = ranks
    reports = []
    nnpatch.activation_patching(model(), CLEAN, CORRUPT, batch_size=2, progress=lambda d, t: reports.append((d, t)),
                                **OPTIONS)
    assert rank1["reports"] == []
    assert rank0["reports"][-1] == reports[-1]  # same total: the live runs of all ranks
    assert [d for d, _ in rank0["reports"]] == sorted(d for d, _ in rank0["reports"])


def test_each_rank_keeps_its_own_checkpoint(ranks):
    _, out = ranks
    assert sorted(p.name for p in out.glob("run*.safetensors")) == ["run.rank0-of-2.safetensors",
                                                                     "run.rank1-of-2.safetensors"]


def test_a_failing_rank_stops_every_rank_with_its_message(ranks):
    (rank0, rank1), _ = ranks
    assert rank0["one_rank_fails"] == ("NNPatchError: rank 1 of 2 failed, so the distributed sweep stops on "
                                       "every rank: RuntimeError: boom on rank 1")
    assert rank1["one_rank_fails"] == "RuntimeError: boom on rank 1"


def test_a_damaged_checkpoint_on_one_rank_stops_both(ranks):
    (rank0, rank1), _ = ranks
    assert rank1["bad_checkpoint"].startswith("NNPatchValueError: checkpoint ") and "cannot be read" in rank1["bad_checkpoint"]
    assert rank0["bad_checkpoint"].startswith("NNPatchError: rank 1 of 2 failed") and "cannot be read" in rank0["bad_checkpoint"]


@pytest.mark.parametrize("case,match", [
    ("other_version", r"rank 1 differs from rank 0 \(nnpatch: rank 0 '[^']+', rank 1 '0.0.0-other'\); install "
                      r"the same nnpatch"),
    ("other_weights", r"rank 1 differs from rank 0 \(weights: rank 0 '\w+', rank 1 '\w+'\)"),
    ("too_many_ranks", r"2 ranks for a sweep of 1 pair\(s\) x 1 cell\(s\).* run at most 1 processes"),
    ("custom_metric", r"distributed sweeps need a named metric"),
])
def test_mismatched_ranks_and_too_many_ranks_are_errors_on_every_rank(ranks, case, match):
    (rank0, rank1), _ = ranks
    for got in (rank0[case], rank1[case]):
        assert isinstance(got, str) and got.startswith("NNPatchValueError: ")
        assert re.search(match, got), got


def test_distributed_true_without_torchrun_says_how_to_start_it(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(nnpatch.NNPatchError, match=r"distributed=True needs torch.distributed: start the script "
                                                   r"with torchrun .*nnpatch sweep --nproc 2"):
        one_process(CLEAN, CORRUPT, distributed=True)


def test_nnpatch_sweep_nproc_launches_torchrun_and_reports_once(tmp_path):
    from nnpatch.patching.pairs import default_pairs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    out, saved = tmp_path / "r.html", tmp_path / "r.safetensors"
    run = subprocess.run([sys.executable, "-m", "nnpatch", "sweep", "--nproc", "2", "--pairs", "4", "--by", "layer",
                          "-q", "--out", str(out), "--save", str(saved)],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count(f"wrote {out}") == 1 and run.stdout.count("Activation patching of resid_pre") == 1
    want = nnpatch.activation_patching(nnpatch.models.load("ioi"), default_pairs("ioi", 4), by="layer", progress=False)
    assert torch.allclose(nnpatch.PatchingResult.load(saved).values, want.values, atol=1e-5)


@pytest.mark.parametrize("argv,match", [(["--nproc", "0"], "--nproc 0: give a number of processes"),
                                        (["--nproc", "2", "--attribution"], "--attribution runs in one process")])
def test_nnpatch_sweep_nproc_errors_are_one_line(argv, match, tmp_path, capsys):
    from nnpatch import cli
    assert cli.main(["sweep", "--out", str(tmp_path / "r.html"), *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
