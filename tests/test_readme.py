"""The README's Python examples run as written, and its commands are the ones CI uses."""
import contextlib
import io
import re
from pathlib import Path

from nnpatch.engine import compile_source

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_examples_run_and_print_what_they_say():
    plain = [b for b in blocks("python") if not b.lstrip().startswith("%")]
    assert len(plain) >= 3
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in plain:
            exec(compile_source(block, "<README.md>"), namespace)
    assert out.getvalue().splitlines()[0] == " Mary"      # the engine example's patched answer
    result, estimate = namespace["result"], namespace["estimate"]
    assert result.values.shape == estimate.values.shape == (4, 14)


def test_two_commands_and_ci_runs_the_second():
    (commands,) = blocks("bash")
    lines = [line.split("#")[0].strip() for line in commands.strip().splitlines()]
    assert lines == ["bash scripts/install.sh && nnpatch sweep", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_the_docs_benchmarks_page_shows_the_readmes_measured_table():
    def table(text):
        return [line for line in text.splitlines() if line.startswith("|")]
    def how_measured(text):
        return re.search(r"^Measured on.*?\n\n", text, flags=re.S | re.M).group(0)
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert table(page) == table(README) and how_measured(page) == how_measured(README)
