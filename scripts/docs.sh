#!/usr/bin/env bash
# Builds the documentation site into site/ (MkDocs + Material + mkdocstrings + mkdocs-jupyter).
# The tutorial notebooks are executed during the build, offline, on the bundled models.
# Usage: bash scripts/docs.sh [mkdocs build options]      then open site/index.html
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q -e ".[docs]"
# plotly figures as HTML (plotly.js inline, so the built pages need no CDN for them) rather than
# the bare JSON mimetype that nbconvert cannot render.
export PLOTLY_RENDERER=notebook NO_MKDOCS_2_WARNING=1
exec "$PY" -m mkdocs build --strict "$@"
