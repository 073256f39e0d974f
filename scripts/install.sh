#!/usr/bin/env bash
# Installs nnpatch (editable) into the current Python without pulling a CUDA build of torch.
# Usage: bash scripts/install.sh [test]
#   Installs nnpatch with its Jupyter extras (magics, workbench, `nnpatch lab`); with "test",
#   also what the test suite needs.
# torch: the package asks only for torch>=2.4. When no torch is importable we install the
# CPU build 2.13.0 first, so pip never resolves a plain "torch" to the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
extras="[jupyter]"
[ "${1:-}" = "test" ] && extras="[jupyter,test]"
"$PY" -m pip install -q -e ".${extras}"
