"""Redraw the workbench screenshots in docs/ from the browser tests.

    python scripts/screenshots.py        # needs Debian's chromium, playwright and jupyterlab

The browser tests (tests/test_workbench_browser.py, tests/test_circuit_browser.py) drive the
workbench in a real JupyterLab and save a picture at each step they check, in out/screenshots/.
This script runs them and copies the pictures the documentation shows to docs/, so every picture
there is of a page whose numbers a test has just compared with the Python API. About 4 minutes
on two cores; not part of CI.
"""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "out" / "screenshots"
# out/screenshots/<name> -> docs/<name>
DOCS = {
    "workbench-1280.png": "workbench.png",  # heatmap and inspector side by side, 1280 x 800
    "workbench-800.png": "workbench-800.png",  # the inspector below the heatmap, 800 x 900
    "workbench-mean.png": "workbench-mean.png",  # all pairs (mean) and one heatmap per pair
    "workbench-head.png": "workbench-head.png",  # a head's attention pattern and direct effect
    "workbench-logit-lens.png": "workbench-logit-lens.png",  # clean, corrupt and patched lenses
    "circuit-tab.png": "workbench-circuit.png",  # the Circuit tab after a click on an edge
    "workbench-length-warning.png": "workbench-length-warning.png",  # prompts of different lengths
}


def main() -> int:
    for name in DOCS:
        (SHOTS / name).unlink(missing_ok=True)
    tests = ["tests/test_workbench_browser.py", "tests/test_circuit_browser.py"]
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT)
    if code != 0:
        print("the browser tests failed: docs/ keeps its pictures", file=sys.stderr)
        return code
    missing = [name for name in DOCS if not (SHOTS / name).exists()]
    if missing:
        print(f"the tests saved no {', '.join(missing)}: docs/ keeps its pictures", file=sys.stderr)
        return 1
    for name, target in DOCS.items():
        shutil.copyfile(SHOTS / name, ROOT / "docs" / target)
        print(f"docs/{target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
