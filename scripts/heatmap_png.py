"""Render the main job's heatmap (`nnpatch sweep`) to docs/heatmap.png for the README.

    python scripts/heatmap_png.py            # needs Debian's chromium and playwright

The figure is the one `nnpatch sweep` writes as HTML; chromium draws it and Playwright takes the
picture, so no image-export package (kaleido) is needed.
"""
import shutil
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

import nnpatch

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    model = nnpatch.models.load("ioi")
    pairs = nnpatch.tasks.ioi(8, template=0)
    result = nnpatch.activation_patching(model, pairs, site="resid_pre", by=("layer", "pos"), progress=False)
    fig = result.plot()
    fig.update_layout(width=900, height=420)
    with tempfile.TemporaryDirectory() as tmp:
        page_file = Path(tmp) / "heatmap.html"
        fig.write_html(page_file, include_plotlyjs=True, full_html=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 920, "height": 440})
            page.goto(page_file.as_uri())
            page.wait_for_selector(".main-svg")
            out = ROOT / "docs" / "heatmap.png"
            page.locator(".plotly-graph-div").screenshot(path=str(out))
            browser.close()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
