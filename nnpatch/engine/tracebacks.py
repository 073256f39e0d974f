"""Tracebacks that show the user's lines, not nnpatch's.

A trace body runs inside the engine (greenlets, hooks, the model's own modules). When it raises,
the user should see their own line and the model code it called, not the frames between. These
functions rebuild a traceback from the frames worth showing; `install()` adds the one
`sys.excepthook` wrapper that scripts need, and is called on first use (trace entry, IPython
extension load), never on import.
"""
from __future__ import annotations

import os
import sys
import types

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

# Code objects whose frames an uncaught error never shows (Tracer.__enter__ and __exit__).
HIDDEN: set[types.CodeType] = set()


def user_frames(tb, user_file: str):
    """The traceback without nnpatch's frames and the model plumbing they call: a frame of
    `user_file` is kept, and so is library code the user's line called, until nnpatch is
    entered again."""
    kept = []
    in_engine = False
    for entry in entries(tb):
        filename = entry.tb_frame.f_code.co_filename
        if filename == user_file:
            in_engine = False
            kept.append(entry)
        elif filename.startswith(_PACKAGE_DIR) or "greenlet" in filename:
            in_engine = True
        elif not in_engine:
            kept.append(entry)
    return _chain(kept)


def cell_frames(tb, filename: str):
    """The traceback from a generated cell's own code on (`filename` names the cell): no frames
    of nnpatch, and none of the generated lines that only lead into where the error happened."""
    kept = [e for e in entries(tb) if not e.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)]
    cell = [i for i, e in enumerate(kept)
            if e.tb_frame.f_code.co_filename == filename and e.tb_frame.f_code.co_name == "<module>"]
    if cell:
        kept = kept[cell[-1]:]
    return _chain(kept)


def without_hidden(tb):
    """`tb` without the frames of the code objects in HIDDEN."""
    return _chain([entry for entry in entries(tb) if entry.tb_frame.f_code not in HIDDEN])


class _ExceptHook:
    """Uncaught errors of a script's trace body show the script's lines only.

    Wraps whatever `sys.excepthook` was, and changes nothing but the frames in HIDDEN (IPython
    and pytest skip them by `__tracebackhide__`).
    """

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, exc_type, exc, tb):
        tb = without_hidden(tb)
        if isinstance(exc, BaseException):
            exc.__traceback__ = tb  # the default hook prints the exception's own traceback
        self.previous(exc_type, exc, tb)


def install() -> None:
    """Wrap `sys.excepthook` once, so that uncaught trace errors skip the engine's frames."""
    if not isinstance(sys.excepthook, _ExceptHook):
        sys.excepthook = _ExceptHook(sys.excepthook)


def entries(tb) -> list:
    """The traceback's entries, outermost first."""
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    return entries


def _chain(entries: list):
    """A new traceback through `entries`, outermost first."""
    result = None
    for entry in reversed(entries):
        result = types.TracebackType(result, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return result
