"""The IPython magics, driven through an InteractiveShell and checked against plain-PyTorch hooks."""
import math
import pathlib
import re

import pytest
import torch
from conftest import all_hooks, gpt2, hooked_forward, prompt, word_tokenizer

pytest.importorskip("IPython")
from IPython.core.error import UsageError  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402

import nnpatch  # noqa: E402
from nnpatch.sweep import patch_cells  # noqa: E402
from nnpatch.bundled.tasks import PromptPairs  # noqa: E402

CLEAN, CORRUPT = prompt(1, 2, 3, 4), prompt(1, 2, 3, 5)  # the last token differs
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "magics.md"
PACKAGE = str(pathlib.Path(nnpatch.__file__).parent)


@pytest.fixture(scope="module")
def hf():
    net = gpt2()
    torch.manual_seed(1)
    with torch.no_grad():  # a wider embedding, so that the top-1 prediction follows the prompt
        net.transformer.wte.weight.normal_(std=1.0)
    return net


@pytest.fixture(scope="module")
def shell(hf):
    import plotly.io as pio
    from IPython.testing.globalipapp import get_ipython
    ip = get_ipython()
    ip.run_line_magic("colors", "nocolor")
    ip.run_line_magic("load_ext", "nnpatch")
    renderer, pio.renderers.default = pio.renderers.default, "plotly_mimetype"  # not a browser
    ip.user_ns.update(model=nnpatch.LanguageModel(hf, tokenizer=word_tokenizer()), hf=hf,
                      p=CLEAN, q=CORRUPT, nnpatch=nnpatch)
    yield ip
    pio.renderers.default = renderer


def run(shell, cell):
    """Run a cell as a notebook would; the result and everything it printed or displayed."""
    with capture_output() as out:
        result = shell.run_cell(cell, store_history=True)
    return result, out


def ok(shell, cell):
    result, out = run(shell, cell)
    assert result.error_in_exec is None, out.stdout + out.stderr
    return result, out


# -- plain PyTorch references -------------------------------------------------------------------

def forward(hf, text, edits=()):
    """Logits of a plain forward, with forward hooks `(module, fn(output) -> output)` attached."""
    return hooked_forward(hf, text, [(m, lambda mod, args, out, fn=fn: fn(out)) for m, fn in edits])


def captured(hf, text, module):
    store = {}
    forward(hf, text, [(module, lambda out: store.setdefault("out", out.clone()))])
    return store["out"]


def put(pos, value):
    """A hook edit that writes `value` at position `pos`."""
    def edit(out):
        out = out.clone()
        out[(slice(None), *pos) if isinstance(pos, tuple) else (slice(None), pos)] = value
        return out
    return edit


# -- %%trace ------------------------------------------------------------------------------------

def test_trace_with_inputs_is_one_invoke(shell, hf):
    ok(shell, "%%trace model p\n"
              "hidden = model.transformer.h[1].mlp.output.clone()\n"
              "model.transformer.h[1].mlp.output[:, 2] = 0\n"
              "logits = model.output.logits\n"
              "note = \"\"\"two\nlines\"\"\"\n")  # indented into the trace, but not inside the string
    ns = shell.user_ns
    assert ns["note"] == "two\nlines"
    mlp = hf.transformer.h[1].mlp
    assert torch.allclose(ns["hidden"], captured(hf, CLEAN, mlp), atol=1e-5)
    assert torch.allclose(ns["logits"], forward(hf, CLEAN, [(mlp, put(2, 0.0))]), atol=1e-4)
    assert ns["tracer"] is not None


def test_trace_invokes_patch_between_runs(shell, hf):
    ok(shell, "%%trace model\n"
              "with tracer.invoke(p) as source:\n"
              "    pass\n"
              "with tracer.invoke(q):\n"
              "    model.transformer.h[1].output[:, 3] = model.of(source).transformer.h[1].output[:, 3]\n"
              "    patched = model.output.logits[:, -1]\n")
    block = hf.transformer.h[1]
    expected = forward(hf, CORRUPT, [(block, put(3, captured(hf, CLEAN, block)[:, 3]))])[:, -1]
    assert torch.allclose(shell.user_ns["patched"], expected, atol=1e-4)


def test_trace_generate_is_a_generation(shell, hf):
    ok(shell, "%%trace model --generate 3 p\n"
              "last = []\n"
              "for step in tracer.all():\n"
              "    model.transformer.h[1].output[:, -1] += 1.0\n"
              "    last.append(model.transformer.h[1].output[:, -1])\n"
              "ids = model.generator.output\n")
    seen = []

    def steer(module, args, out):
        out = out.clone()
        out[:, -1] += 1.0
        seen.append(out[:, -1].clone())
        return out
    handle = hf.transformer.h[1].register_forward_hook(steer)
    try:
        want = hf.generate(**word_tokenizer()(CLEAN, return_tensors="pt"), max_new_tokens=3, pad_token_id=0)
    finally:
        handle.remove()
    ns = shell.user_ns
    assert torch.equal(ns["ids"], want)
    assert len(ns["last"]) == len(seen) == want.shape[1] - 4
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ns["last"], seen))
    assert all_hooks(hf) == 0
    with pytest.raises(UsageError, match="--generate takes the number of new tokens"):
        shell.run_cell_magic("trace", "model --generate 0 p", "x = 1\n")


def test_trace_error_shows_the_cell_line_and_no_engine_frames(shell, hf):
    result, out = run(shell, "%%trace model p\n"
                             "h = model.transformer.h[1].output\n"
                             "x = h.no_such_attribute\n"
                             "y = 1\n")
    assert isinstance(result.error_in_exec, AttributeError)
    text = out.stdout
    assert re.search(r"Cell In\[\d+\], line 3", text)
    assert "----> 3 x = h.no_such_attribute" in text and "      1 %%trace model p" in text
    assert PACKAGE not in text and "greenlet" not in text
    assert all_hooks(hf) == 0


def test_engine_error_inside_a_cell_points_at_the_cell(shell, hf):
    result, out = run(shell, "%%trace model p\n"
                             "late = model.transformer.h[2].output\n"
                             "early = model.transformer.h[0].output\n")
    assert isinstance(result.error_in_exec, nnpatch.NNPatchError)
    assert "----> 3 early = model.transformer.h[0].output" in out.stdout
    assert "read after" in out.stdout and PACKAGE not in out.stdout
    assert all_hooks(hf) == 0


# -- %%patch ------------------------------------------------------------------------------------

def test_patch_measures_three_runs_like_hooks(shell, hf):
    shell.user_ns.update(clean="my clean prompt", corrupt="my corrupt prompt")
    result, _ = ok(shell, "%%patch model --clean p --corrupt q --answer \"t4\" --wrong 't5' --out r\n"
                          "model.transformer.h[1].output[:, -1, :16] = clean.transformer.h[1].output[:, -1, :16]\n")
    ns = shell.user_ns
    r = ns["r"]
    assert result.result is r and ns["_"] is r
    block = hf.transformer.h[1]
    clean, corrupt = forward(hf, CLEAN)[:, -1], forward(hf, CORRUPT)[:, -1]
    patched = forward(hf, CORRUPT, [(block, put((-1, slice(0, 16)), captured(hf, CLEAN, block)[:, -1, :16]))])[:, -1]
    for got, want in [(r.clean_logits, clean), (r.corrupt_logits, corrupt), (r.patched_logits, patched)]:
        assert torch.allclose(got, want, atol=1e-4)
    a, w = 6, 7  # ids of t4, t5
    scores = [float(x[0, a] - x[0, w]) for x in (clean, corrupt, patched)]
    assert [r.clean_score, r.corrupt_score, r.patched_score] == pytest.approx(scores, abs=1e-3)
    assert r.effect == pytest.approx((scores[2] - scores[1]) / (scores[0] - scores[1]), abs=1e-4)
    assert 0.02 < r.effect < 0.98  # a partial patch, so the check above could fail
    assert (r.answer, r.wrong) == (["t4"], ["t5"])
    assert "effect" in repr(r)
    # The cell's `clean` and `corrupt` were the other runs; the notebook's are as they were.
    assert (ns["clean"], ns["corrupt"]) == ("my clean prompt", "my corrupt prompt")
    assert not [k for k in ns if k.startswith("__nnpatch")]


def test_patch_answers_default_to_top1_predictions(shell, hf):
    ok(shell, "%%patch model --clean p --corrupt q\n"
              "model.transformer.h[2].output[:, -1] = clean.transformer.h[2].output[:, -1]\n")
    r = shell.user_ns["_"]
    assert r.answer == [word_tokenizer().decode([int(forward(hf, CLEAN)[0, -1].argmax())])] == ["t4"]
    assert r.wrong == ["t5"]
    assert r.effect == pytest.approx(1.0, abs=1e-4)  # the whole last position of the last layer


@pytest.mark.parametrize("metric", ["logit_diff", "prob", "kl"])
def test_patch_task_pairs_score_like_patch_cells(shell, metric):
    pairs = PromptPairs(clean=[CLEAN, prompt(7, 8, 9, 4)], corrupt=[CORRUPT, prompt(7, 8, 9, 5)],
                        answer=["t4", "t4"], wrong=["t5", "t5"], meta=[{}, {}])
    shell.user_ns["pairs"] = pairs
    ok(shell, f"%%patch model --clean pairs --metric {metric} --out r\n"
              "model.transformer.h[1].input[:, 3] = clean.transformer.h[1].input[:, 3]\n")
    r = shell.user_ns["r"]
    ref = patch_cells(shell.user_ns["model"], pairs, cells=[(1, 3)], site="resid_pre", metric=metric)
    assert r.metric == metric and r.answer == ["t4", "t4"]
    assert [r.clean_score, r.corrupt_score, r.patched_score, r.effect] == pytest.approx(
        [ref.clean_score, ref.corrupt_score, ref.patched_score, ref.score], abs=1e-4)
    assert torch.allclose(r.patched_logits, ref.patched_logits, atol=1e-4)


def test_patch_metric_can_be_a_notebook_function(shell, hf):
    ok(shell, "def answer_logit(logits):\n    return logits[:, 6].mean()\n")
    ok(shell, "%%patch model --clean p --corrupt q --metric answer_logit\n"
              "model.transformer.h[0].output[:, -1] = clean.transformer.h[0].output[:, -1]\n")
    r = shell.user_ns["_"]
    assert r.metric == "answer_logit"
    assert [r.clean_score, r.corrupt_score] == pytest.approx(
        [float(forward(hf, text)[0, -1, 6]) for text in (CLEAN, CORRUPT)], abs=1e-3)


def test_patch_cell_error_leaves_no_hooks_and_no_names(shell, hf):
    shell.user_ns["clean"] = "kept"
    result, out = run(shell, "%%patch model --clean p --corrupt q\n"
                             "x = clean.transformer.h[1].output\n"
                             "model.transformer.h[1].output[:, -1] = x.missing\n")
    assert isinstance(result.error_in_exec, AttributeError)
    assert "x.missing" in out.stdout and PACKAGE not in out.stdout
    assert all_hooks(hf) == 0
    assert shell.user_ns["clean"] == "kept"
    assert not [k for k in shell.user_ns if k.startswith("__nnpatch")]


def test_patch_of_the_wrong_shape_names_the_module_path_and_both_shapes(shell, hf):
    n = shell.execution_count
    result, out = run(shell, "%%patch model --clean p --corrupt q\n"
                             "x = 1\n"
                             "model.transformer.h[1].output[:, -1] = clean.transformer.h[1].output[:, -1, :3]\n"
                             "y = 2\n")
    e = result.error_in_exec
    assert isinstance(e, nnpatch.NNPatchError) and isinstance(e, ValueError)
    assert str(e) == ("cannot set transformer.h.1.output[:, -1]: it has shape (1, 32), the new value has shape "
                      "(3,); give a tensor of shape (1, 32) (or one that broadcasts to it)")
    text = out.stdout
    assert f"Cell In[{n}], line 3" in text  # the cell's In[n] and its own line number
    assert "      1 %%patch model --clean p --corrupt q\n      2 x = 1\n----> 3 model.transformer.h[1]" in text
    assert "      4 y = 2" in text
    for generated in ("__nnpatch", "tracer.invoke", "run_cell_magic", "interactiveshell", PACKAGE, "<%%patch"):
        assert generated not in text, generated
    assert all_hooks(hf) == 0
    # A whole-value write says the same, from the engine
    result, out = run(shell, "%%patch model --clean p --corrupt q\n"
                             "model.transformer.h[1].output = clean.transformer.h[1].output[:, :2]\n")
    assert "cannot set transformer.h.1.output: it has shape (1, 4, 32) in this invoke, the new value has shape " \
           "(1, 2, 32)" in str(result.error_in_exec)
    assert "----> 2 model.transformer.h[1].output = " in out.stdout and "__nnpatch" not in out.stdout


def test_other_shape_errors_in_a_cell_stay_as_pytorch_raised_them(shell, hf):
    shell.user_ns["torch"] = torch
    result, out = run(shell, "%%patch model --clean p --corrupt q\n"
                             "h = model.transformer.h[1].output\n"
                             "mixed = torch.zeros(3) + torch.zeros(4)\n")
    assert type(result.error_in_exec) is RuntimeError
    assert "----> 3 mixed = torch.zeros(3) + torch.zeros(4)" in out.stdout
    assert all_hooks(hf) == 0


# -- %patch_sweep -------------------------------------------------------------------------------

def sweep_pairs():
    return PromptPairs(clean=[CLEAN, prompt(7, 8, 9, 4)], corrupt=[CORRUPT, prompt(7, 8, 9, 5)],
                       answer=["t4", "t4"], wrong=["t5", "t5"], meta=[{}, {}])


def test_patch_sweep_is_the_api_call_and_shows_the_heatmap(shell):
    shell.user_ns["pairs"] = sweep_pairs()
    result, out = ok(shell, "%patch_sweep model --clean pairs --site 'mlp_out' --by layer,pos --out r")
    r = shell.user_ns["r"]
    ref = nnpatch.activation_patching(shell.user_ns["model"], sweep_pairs(), site="mlp_out", progress=False)
    assert result.result is r and shell.user_ns["_"] is r
    assert r.method == "activation" and r.site == "mlp_out" and r.dims == ("layer", "pos")
    assert torch.allclose(r.values, ref.values, atol=1e-5)
    assert any("application/vnd.plotly.v1+json" in o.data for o in out.outputs)


def test_patch_sweep_attribution_options(shell):
    shell.user_ns["pairs"] = sweep_pairs()
    ok(shell, "%patch_sweep model --clean pairs --site resid_pre --by layer --metric prob "
              "--layers [0, 2] --direction noise --attribution --out r")
    r = shell.user_ns["r"]
    ref = nnpatch.attribution_patching(shell.user_ns["model"], sweep_pairs(), site="resid_pre", by=("layer",),
                                       metric="prob", layers=[0, 2], direction="noise", progress=False)
    assert (r.method, r.metric, r.direction, r.layers) == ("attribution", "prob", "noise", [0, 2])
    assert torch.allclose(r.values, ref.values, atol=1e-5)


def test_patch_sweep_answers_default_to_top1_predictions(shell):
    r = ok(shell, "%patch_sweep model --clean p --corrupt q --by layer")[0].result
    ref = nnpatch.activation_patching(shell.user_ns["model"], CLEAN, CORRUPT, answer="t4", wrong="t5",
                                      by=("layer",), progress=False)
    assert torch.allclose(r.values, ref.values, atol=1e-5)


# -- mistakes in the magic line are one-line UsageErrors ------------------------------------------

@pytest.mark.parametrize("cell, message", [
    ("%%trace modle p\nx = 1\n", "no model named 'modle' in the notebook; did you mean 'model'?"),
    ("%%trace hf p\nx = 1\n", "'hf' is a GPT2LMHeadModel, not an nnpatch model"),
    ("%%trace p\nx = 1\n", "'p' is a str, not an nnpatch model"),
    ("%%trace model p\n\n", "the cell is empty"),
    ("%%trace model p\nx = 1\ny = (\n", "SyntaxError in cell line 3"),
    ("%%trace model p,,\nx = 1\n", "the magic line does not make valid Python"),
    ("%%trace model (p\nx = 1\n", "cannot split the magic line"),
    ("%%patch model --corrupt q\nx = 1\n", "the following arguments are required: --clean"),
    ("%%patch model --clean p\nx = 1\n", "--corrupt is missing"),
    ("%%patch model --clean p --corrupt q --metirc prob\nx = 1\n", "did you mean --metric?"),
    ("%%patch model --clean p --corrupt q --metric kll\nx = 1\n", "unknown metric 'kll'; did you mean 'kl'?"),
    ("%%patch model --clean p --corrupt q --answer 't4 t5'\nx = 1\n", "--answer 't4 t5' is 2 tokens"),
    ("%%patch model --clean nowhere --corrupt q\nx = 1\n", "--clean nowhere: NameError"),
    ("%%patch model --clean p --corrupt q --out 2x\nx = 1\n", "'2x' is not a variable name"),
    ("%patch_sweep model --clean p --corrupt q --site resid_pr", "resid_pr"),
    ("%patch_sweep model --clean p --corrupt q --direction sideways", "invalid choice: 'sideways'"),
    ("%patch_sweep model --clean p --corrupt 'a b' --answer 't4' --wrong 't5'", "%patch_sweep:"),
])
def test_usage_errors_are_one_line(shell, hf, cell, message):
    result, out = run(shell, cell)
    assert isinstance(result.error_in_exec, UsageError), out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("UsageError: "), out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stdout
    assert all_hooks(hf) == 0


def test_option_values_are_python_expressions():
    from nnpatch.jupyter.magic_line import words as _words
    line = "model --clean nnpatch.tasks.ioi(8, template=0) --answer \" Mary\" --by layer,pos  # note"
    assert _words(line) == ["model", "--clean", "nnpatch.tasks.ioi(8, template=0)", "--answer", "\" Mary\"",
                            "--by", "layer,pos"]
    with pytest.raises(UsageError):
        _words("model --clean (p")


# -- the documented example runs -------------------------------------------------------------------

def test_docs_example_runs(shell):
    cells = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert len(cells) >= 3
    shown = [ok(shell, cell)[0].result for cell in cells]
    sweep, effect = shown[1], shown[2]  # the three cells to paste come first
    assert isinstance(sweep, nnpatch.PatchingResult) and sweep.dims == ("layer", "pos")
    assert math.isclose(effect.effect, float(sweep.values[2, -1]), abs_tol=1e-3)
    assert shell.user_ns["top"] == shell.user_ns["pairs"].answer[0]
