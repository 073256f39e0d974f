"""How every nnpatch figure displays: plotly's config without the logo or cloud buttons, a light
or dark theme, and a `Figure` that shows itself with that config.

nnpatch runs on the user's machine, so no figure offers to send its data anywhere. A plain plotly
`Figure` takes its display config from each `show()` call; nnpatch's `Figure` brings its own, in
`fig.show()`, in a notebook's rich display (which a saved notebook keeps) and in `write_html`.
For a `FigureWidget`, set `widget._config = CONFIG`.

    >>> import plotly.graph_objects as go
    >>> from nnpatch.jupyter import figures
    >>> fig = figures.finish(go.Figure(go.Bar(y=[1, 3])), theme="dark")   # what every nnpatch figure gets
    >>> isinstance(fig, figures.Figure), fig.layout.modebar.remove, fig.layout.autosize
    (True, ('sendDataToCloud',), True)
    >>> fig.layout.title.pad.t == figures.MODEBAR_PX, fig.layout.xaxis.automargin
    (True, True)
    >>> figures.CONFIG["displaylogo"]
    False
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from ..errors import NNPatchValueError

# Only keys plotly.py knows (it warns on others): plotly.js 3 has no Chart Studio button left,
# and "sendDataToCloud" is the one cloud button it still draws when asked.
CONFIG = {"displaylogo": False, "showSendToCloud": False, "modeBarButtonsToRemove": ["sendDataToCloud"]}
"""plotly's display config of every nnpatch figure: no plotly logo, no button that sends data away."""
NO_CLOUD = {"remove": ["sendDataToCloud"]}  # the same in the layout, which a FigureWidget keeps too
MODEBAR_PX = 32
"""The height of plotly's modebar (its buttons at the figure's top right): a figure's title
starts below it, so that the buttons never cover the title in a narrow container."""
# The title hangs from the container's top, below the modebar, and pushes the top margin down
# to make room for itself; every axis pushes its margins for its tick labels (rotated position
# labels would otherwise leave the figure at the left or bottom).
_TITLE = {"yref": "container", "y": 1, "yanchor": "top", "pad": {"t": MODEBAR_PX}}
if "automargin" in go.layout.Title()._valid_props:  # plotly >= 5.14; before it, the default top margin holds one line
    _TITLE["automargin"] = True
THEMES = ("auto", "light", "dark")
_CLEAR = "rgba(0,0,0,0)"  # transparent: the page's own background shows through
_theme = {"name": "auto"}


class Figure(go.Figure):
    """A plotly `Figure` that displays with `CONFIG` (no plotly logo, no cloud button)."""

    def show(self, *args, config: dict | None = None, **kwargs):
        return super().show(*args, config={**CONFIG, **(config or {})}, **kwargs)

    def _ipython_display_(self):
        if pio.renderers.render_on_display and pio.renderers.default:
            pio.show(self, config=CONFIG)
        else:
            print(repr(self))

    def _repr_mimebundle_(self, include=None, exclude=None, validate=True, **kwargs):
        kwargs.setdefault("config", CONFIG)
        return super()._repr_mimebundle_(include, exclude, validate, **kwargs)

    def to_html(self, *args, **kwargs):
        kwargs.setdefault("config", CONFIG)
        return super().to_html(*args, **kwargs)

    def write_html(self, *args, **kwargs):
        kwargs.setdefault("config", CONFIG)
        return super().write_html(*args, **kwargs)


def finish(fig: go.Figure, theme: str | go.layout.Template | None) -> Figure:
    """`fig` as an nnpatch `Figure`: the theme's template, the width of its container, no cloud
    button, its title below the modebar and margins that hold every tick label."""
    fig = fig if isinstance(fig, Figure) else Figure(fig)
    fig.update_layout(template=template(theme), autosize=True, width=None, modebar=NO_CLOUD, title=_TITLE)
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def set_theme(theme: str | go.layout.Template) -> None:
    """The theme of every later nnpatch figure drawn without `theme=...`: "light", "dark", a
    plotly template (a name or a `go.layout.Template`), or "auto" (the default: dark when
    JupyterLab's saved theme setting names a dark theme).

        >>> from nnpatch import heatmap
        >>> heatmap.set_theme("dark")
        >>> heatmap.set_theme("auto")
    """
    template(theme)  # checks it
    _theme["name"] = theme


def template(theme: str | go.layout.Template | None = None) -> go.layout.Template:
    """The plotly template of a theme (None: the one `set_theme` chose)."""
    theme = _theme["name"] if theme is None else theme
    if isinstance(theme, go.layout.Template):
        return theme
    if theme == "auto":
        theme = "dark" if _jupyterlab_is_dark() else "light"
    if theme in ("light", "dark"):
        return _built(theme)
    if isinstance(theme, str) and theme in pio.templates:
        return pio.templates[theme]
    raise NNPatchValueError(f"theme {theme!r} is unknown; use one of {', '.join(THEMES)}, or a plotly "
                            f"template: {', '.join(sorted(pio.templates))}")


@functools.lru_cache(maxsize=None)
def _built(theme: str) -> go.layout.Template:
    """nnpatch's light or dark template, built once (~13 ms); plotly copies a template into every
    figure it is given to, so sharing this one is safe."""
    base = go.layout.Template(pio.templates["plotly_dark" if theme == "dark" else "plotly_white"])
    base.layout.paper_bgcolor = _CLEAR
    if theme == "dark":
        base.layout.plot_bgcolor = _CLEAR
    return base


def _jupyterlab_is_dark() -> bool:
    """Whether JupyterLab's saved theme setting names a dark theme (read, never written)."""
    path = _jupyterlab_settings() / "@jupyterlab" / "apputils-extension" / "themes.jupyterlab-settings"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return False
    found = re.search(r'^\s*"theme"\s*:\s*"([^"]*)"', text, flags=re.MULTILINE)
    return bool(found) and "dark" in found.group(1).lower()


def _jupyterlab_settings() -> Path:
    if os.environ.get("JUPYTERLAB_SETTINGS_DIR"):
        return Path(os.environ["JUPYTERLAB_SETTINGS_DIR"])
    try:
        from jupyter_core.paths import jupyter_config_dir
    except ImportError:
        return Path.home() / ".jupyter" / "lab" / "user-settings"
    return Path(jupyter_config_dir()) / "lab" / "user-settings"
