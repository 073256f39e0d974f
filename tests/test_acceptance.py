"""The acceptance programs in ../shared/acceptance (the forum threads' own code) must exit 0."""
import subprocess
import sys

import pytest

from conftest import SHARED

PROGRAMS = ["seed001_patching.py", "seed000_attribution.py"]


@pytest.mark.parametrize("program", PROGRAMS)
def test_acceptance_program(program):
    folder = SHARED / "acceptance"
    if not (folder / program).exists():
        pytest.fail(f"{folder / program} is missing: CI runs with ../shared beside the clone")
    done = subprocess.run([sys.executable, program], cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 failed" in done.stdout
