"""Errors raised by a magic's cell, shown as the cell's own.

A magic runs its cell inside code it generates (`%%patch` puts it in a trace with three
invokes), so Python's traceback points at generated lines. Here the error is shown instead at
the cell's `In[n]` and line number, with the cell's own text around it (the magic line is line 1),
and no frame of the generated code, of IPython's magic machinery or of nnpatch. A write of the
wrong shape to a module value (`model.transformer.h[2].input[:, -1] = x`), which PyTorch reports
without saying where, becomes an error that names the module path and both shapes.

The exception keeps its real traceback (for `%debug`); only what the notebook prints changes,
through IPython's `_render_traceback_` hook on the exception.
"""
from __future__ import annotations

import ast
import re
import sys
import types
from dataclasses import dataclass
from typing import Callable

from ..engine.tracebacks import cell_frames, entries
from ..errors import NNPatchValueError

# PyTorch's words for a write whose value does not fit: (the selection's shape, the value's shape)
_SHAPES = (
    re.compile(r"Target sizes: \[([^\]]*)\]\.\s+Tensor sizes: \[([^\]]*)\]"),
    re.compile(r"value tensor of shape \[([^\]]*)\] cannot be broadcast to indexing result of shape "
               r"\[([^\]]*)\]"),
)
_VALUE_FIRST = {1}  # which of _SHAPES name the value's shape first


def cell_number(shell) -> int:
    """The n of `In[n]`, the cell running now. `shell.execution_count` is that number while a cell
    runs on IPython 8, and already the next one on IPython 9; the number IPython gave the running
    cell's code (the outermost frame of a cell's code) is the one its prompt shows on both."""
    numbers = getattr(shell.compile, "_filename_map", None) or {}
    found = None
    frame = sys._getframe(1)
    while frame is not None:
        found = numbers.get(frame.f_code.co_filename, found)
        frame = frame.f_back
    return shell.execution_count if found is None else found


@dataclass
class Cell:
    """A magic's cell and where its lines sit in the generated code.

    `to_cell_line(generated line)` gives the cell's line number (the magic line is 1); lines of
    generated code that are not the cell's map to the magic line."""

    shell: object
    text: str  # the cell as the user wrote it, magic line first
    filename: str  # the generated code's
    to_cell_line: Callable[[int], int]
    model: str  # the name of the model in the notebook

    def reraise(self, e: BaseException):
        """Raise `e` (or the clearer error it stands for) from the cell's lines."""
        __tracebackhide__ = True
        tb = cell_frames(e.__traceback__, self.filename)
        clearer = self._shape_error(e, tb)
        if clearer is not None:
            self._show_as_cell(clearer, tb)
            raise clearer.with_traceback(tb) from None
        self._show_as_cell(e, tb)
        raise e.with_traceback(tb)

    # -- what is printed -------------------------------------------------------------------------
    def _show_as_cell(self, e: BaseException, tb) -> None:
        name = self.shell.compile.cache(self.text, cell_number(self.shell), raw_code=self.text)
        shown = None
        for entry in reversed(entries(tb)):
            if entry.tb_frame.f_code.co_filename == self.filename:
                shown = _at_line(name, self.to_cell_line(entry.tb_lineno), shown)
            else:
                shown = types.TracebackType(shown, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
        formatter = self.shell.InteractiveTB

        def render():
            return formatter.structured_traceback(type(e), e, shown, tb_offset=0)
        try:
            e._render_traceback_ = render
        except AttributeError:  # an exception without a __dict__: IPython's own traceback then
            pass

    # -- a wrong-shape write to a module value -----------------------------------------------------
    def _shape_error(self, e: BaseException, tb) -> NNPatchValueError | None:
        """The error naming the module path and both shapes, when `e` is PyTorch refusing a
        write of the wrong shape in a cell line that writes to `MODEL.<path>.output[...]` or
        `.input[...]`."""
        if not isinstance(e, RuntimeError) or tb is None:
            return None
        last = entries(tb)[-1]
        if last.tb_frame.f_code.co_filename != self.filename:
            return None  # raised deeper down, not by the cell's own statement
        target = self._written_module_value(self.to_cell_line(last.tb_lineno))
        if target is None:
            return None
        where, index = target
        message = " ".join(str(e).split())
        for i, pattern in enumerate(_SHAPES):
            found = pattern.search(message)
            if found:
                first, second = (_shape(s) for s in found.groups())
                selection, value = (second, first) if i in _VALUE_FIRST else (first, second)
                return NNPatchValueError(
                    f"cannot set {where}{index}: it has shape {selection}, the new value has shape {value}; "
                    f"give a tensor of shape {selection} (or one that broadcasts to it)")
        return NNPatchValueError(f"cannot set {where}{index}: {message}")

    def _written_module_value(self, line: int) -> tuple[str, str] | None:
        """(module path with .output / .input, the index written) of the cell statement on
        `line`, if it writes into a module value of the model."""
        body = self.text.split("\n", 1)[1] if "\n" in self.text else ""
        try:
            tree = ast.parse(body)
        except SyntaxError:
            return None
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign)) and node.lineno + 1 == line:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    found = _module_value(target, self.model)
                    if found is not None:
                        return found
        return None


def _module_value(target: ast.expr, model: str) -> tuple[str, str] | None:
    """For `MODEL.a.b[1].output[0][:, -1]`: ("a.b.1.output", "[0][:, -1]")."""
    indices = []
    while isinstance(target, ast.Subscript):
        index = target.slice
        elements = index.elts if isinstance(index, ast.Tuple) else [index]
        indices.append(f"[{', '.join(ast.unparse(x) for x in elements)}]")
        target = target.value
    if not indices or not (isinstance(target, ast.Attribute) and target.attr in ("output", "input")):
        return None
    parts, node = [], target
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            parts.append(str(node.slice.value))  # model.transformer.h[2]: the module path's "2"
            node = node.value
        elif isinstance(node, ast.Name):
            parts.append(node.id)
            break
        else:
            return None
    path = ".".join(reversed(parts))
    if not path.startswith(model + "."):
        return None
    return path[len(model) + 1:], "".join(reversed(indices))


def _shape(text: str) -> str:
    """PyTorch's "1, 32" as Python's "(1, 32)"."""
    return str(tuple(int(n) for n in text.replace(" ", "").split(",") if n))


def _at_line(filename: str, line: int, tb_next):
    """A traceback entry at `line` of `filename` (a frame of a one-statement program there)."""
    try:
        exec(compile("\n" * (line - 1) + "raise __nnpatch_error__", filename, "exec"),
             {"__nnpatch_error__": _Marker()})
    except _Marker as marker:
        entry = marker.__traceback__.tb_next
        return types.TracebackType(tb_next, entry.tb_frame, entry.tb_lasti, line)
    raise AssertionError("unreachable")


class _Marker(Exception):
    pass
