"""scripts/train_bundled.py: a few steps produce a loadable folder, deterministically."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_bundled.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_bundled", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "ioi"
    done = subprocess.run([sys.executable, str(SCRIPT), "ioi", "--seed", "0", "--out", str(out),
                           "--steps", "3", "--batch", "8", "--eval-pairs", "16"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "training.json").read_text())
    assert record["model"] == "ioi" and record["steps"] == 3 and 0 <= record["clean_accuracy"] <= 1
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert len(tok(" Mary")["input_ids"]) == 1 and tok.padding_side == "left"


def test_same_seed_gives_identical_weights(tmp_path):
    train = load_script().train
    for run in ("a", "b"):
        train("table-max", seed=7, out=tmp_path / run, steps=2, batch=8, eval_pairs=0, log_every=0)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b
    train("table-max", seed=8, out=tmp_path / "c", steps=1, batch=8, eval_pairs=0, log_every=0)
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != a
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "a")).__name__ == "LlamaForCausalLM"
