#!/usr/bin/env bash
# Installs the test dependencies and runs the whole test suite (the acceptance programs included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec "${PYTHON:-python3}" -m pytest -q "$@"
