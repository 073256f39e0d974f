#!/usr/bin/env bash
# Installs the test dependencies and runs the whole test suite, the workbench's browser test
# included: that test drives Debian's chromium (Playwright's own browser download does not work
# on a closed network), installed here with apt-get when it is missing and apt-get can run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
bash scripts/install.sh test
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian's chromium for tests/test_workbench_browser.py ..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "warning: could not install chromium (apt-get needs root); the browser test will be skipped" >&2
fi
exec "${PYTHON:-python3}" -m pytest -q "$@"
