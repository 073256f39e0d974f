"""Path patching against nnsight 0.8.1 running the IOI paper's three steps as nnsight programs
(tests/nnsight_circuits.py, in a subprocess: importing nnsight changes process-wide behaviour, see
tests/test_nnsight_differential.py), on the bundled IOI model."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import nnpatch
from nnsight_circuits import CLEAN, CORRUPT, EDGES

if importlib.util.find_spec("nnsight") is None:
    pytest.skip("nnsight is not installed (pip install --no-deps nnsight==0.8.1)", allow_module_level=True)

HERE = pathlib.Path(__file__).resolve().parent


def test_path_patching_matches_nnsight_programs():
    folder = pathlib.Path(nnpatch.__file__).parent / "bundled" / "ioi"
    run = subprocess.run([sys.executable, str(HERE / "nnsight_circuits.py"), str(folder)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    oracle = json.loads(run.stdout.strip().splitlines()[-1])
    model = nnpatch.models.load("ioi")
    moved = 0
    for edge in EDGES:
        sender, receiver = edge.split("->")
        got = nnpatch.path_patching(model, [CLEAN], [CORRUPT], answer=" Mary", wrong=" John", senders=[sender],
                                    receivers=[receiver], metric="logit_diff_raw")
        assert abs(float(got.scores[0]) - oracle[edge]) < 1e-4, (edge, float(got.scores[0]), oracle[edge])
        moved += abs(got.clean_score - oracle[edge]) > 0.1
    assert moved >= 4  # most of these paths matter, so agreement is not agreement on "no change"
