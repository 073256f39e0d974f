"""The caller's frame around a trace (or edit) body: the variables the body assigned are written
back to it, so that they are there after the with-block, as they would be after any block; and
the tracing nnpatch switches on to steer it (`source.skip_body`, `leaving.leave_body`) is put back.

In a module or class body they go into its namespace; in a function, names it declares `global`
go to its globals and the rest into its fast locals (`PyFrame_LocalsToFast` before Python 3.13,
the write-through `f_locals` proxy from 3.13 on).
"""
from __future__ import annotations

import sys
import types


def write_back(frame: types.FrameType, names: dict, declared_global: frozenset[str]) -> None:
    """Make the trace body's assignments visible after the with-block, as for any block."""
    if not names:
        return
    if not frame.f_code.co_flags & 0x1:  # not a function (CO_OPTIMIZED): a module or class body
        frame.f_locals.update(names)
        return
    to_globals = declared_global | _stored_globals(frame.f_code)
    for k in [k for k in names if k in to_globals]:
        frame.f_globals[k] = names.pop(k)
    if not names:
        return
    if sys.version_info >= (3, 13):
        proxy = frame.f_locals
        for k, v in names.items():
            proxy[k] = v
        return
    import ctypes
    frame.f_locals.update(names)
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


_GLOBALS_OF: dict[types.CodeType, frozenset[str]] = {}


def _stored_globals(code: types.CodeType) -> frozenset[str]:
    """Names a function assigns as globals (declared `global` in it)."""
    found = _GLOBALS_OF.get(code)
    if found is None:
        import dis
        found = _GLOBALS_OF[code] = frozenset(
            i.argval for i in dis.get_instructions(code) if i.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"))
    return found


def restore_tracing(frame: types.FrameType, saved) -> None:
    """Put back the tracing (a debugger's, coverage's) that was on before the trace."""
    previous, frame_trace, opcodes = saved
    frame.f_trace = frame_trace
    frame.f_trace_opcodes = opcodes
    sys.settrace(previous)
