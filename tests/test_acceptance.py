"""The forum threads' programs as posted, from ../shared/acceptance, when that folder is beside the
clone (CI puts it there). The project's own versions of the same checks are in
tests/test_forum_threads.py and run everywhere."""
import subprocess
import sys

import pytest

from conftest import SHARED

PROGRAMS = ["seed001_patching.py", "seed000_attribution.py"]


@pytest.mark.parametrize("program", PROGRAMS)
def test_acceptance_program(program):
    folder = SHARED / "acceptance"
    if not (folder / program).exists():
        pytest.skip(f"{folder / program} is not here (only CI's checkout has ../shared); "
                    "tests/test_forum_threads.py runs the same checks")
    done = subprocess.run([sys.executable, program], cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 failed" in done.stdout
