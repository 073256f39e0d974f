#!/usr/bin/env bash
# Runs the engine and sweep tests on the lowest transformers, plotly and ipywidgets that
# pyproject.toml allows, in a throwaway venv layered over the current Python's packages (the
# current Python may itself be a venv, so --system-site-packages would reach the wrong ones).
# Usage: bash scripts/test_lowest.sh   (after scripts/install.sh test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pins=$("$PY" - <<'PY'
import re
text = open("pyproject.toml").read()
for name in ("transformers", "plotly", "ipywidgets"):
    lowest = re.search('"' + name + r'>=([0-9.]+)', text).group(1)
    print(f"{name}=={lowest}", end=" ")
PY
)
venv=$(mktemp -d)/lowest
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$PY" -m venv "$venv"
own=$("$venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
# Read after the venv's own site-packages: what pip installs below shadows the current Python's copies.
# `kernels` stays hidden (None in sys.modules: `import kernels` fails, find_spec finds nothing):
# transformers 5.25 and newer require it, a fresh install of the lowest transformers has none,
# and with it older transformers add modules that a plain install lacks (Llama's shared
# `rotary_fn`), or with kernels 0.15 and newer fail to import at all.
"$PY" -c "import site; print('import site, sys; ' + '; '.join(f'site.addsitedir({d!r})' for d in site.getsitepackages()) + '; sys.modules[\"kernels\"] = None')" \
  > "$own/zz_layered.pth"
echo "lowest declared versions: $pins"
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q $pins
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_engine.py tests/test_engine_calls.py tests/test_gradients.py tests/test_inputs.py \
  tests/test_layers.py tests/test_sweep.py tests/test_sweep_archs.py tests/test_sweep_attribution.py \
  tests/test_result.py tests/test_models.py tests/test_forum_threads.py tests/test_clean_output.py \
  tests/test_workbench_controller.py tests/test_cli.py tests/test_generation.py
