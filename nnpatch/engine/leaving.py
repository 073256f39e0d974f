"""`return`, `break` and `continue` that leave a trace body, as they leave any with-block.

nnpatch runs a trace body itself (see `source`), from `Tracer.__enter__`. A statement that
leaves the body is compiled into `__nnpatch_leave__(line)`: the body ends there (what it did
before is kept; pending invokes run first), its variables are written back to the caller, and the
caller is then made to go on at that statement's own line, still inside the with-block, the way
a debugger's "jump" does. Python's own code for the statement runs from there: it evaluates a
`return` value with the caller's variables, calls the trace's `__exit__`, runs enclosing
`finally` blocks and leaves the loop or function.

Example:
    >>> import torch, nnpatch
    >>> net = nnpatch.Model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> def first_active(xs):
    ...     for i, x in enumerate(xs):
    ...         with net.trace(x):
    ...             active = bool((net[1].output > 0).any())
    ...             if active:
    ...                 return i
    ...     return None
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.eye(2)), net[0].bias.zero_()
    >>> first_active([-torch.ones(1, 2), torch.ones(1, 2)])
    1
"""
from __future__ import annotations

import ast
import sys
import types
import warnings

from ..errors import NNPatchError
from .frames import restore_tracing
from .syntax import at, invoke_with, name_call, steps_with

LEAVE = "__nnpatch_leave__"  # the name compiled bodies call a leaving statement by


class Leave(BaseException):
    """Raised where trace-level code runs a `return`, `break` or `continue` that leaves the body
    (after the pending invokes have run); `line` is the statement's line."""

    def __init__(self, line: int):
        super().__init__(line)
        self.line = line


def leave_body(frame: types.FrameType, header_end: int, line: int):
    """Arrange for the caller to go on at `line`, the `return`, `break` or `continue` that left
    the body, once it reaches the body: Python's own code for that statement then runs (it
    evaluates a return value, leaves the with-block through its `__exit__`, runs enclosing
    `finally` blocks). A jump is what a debugger does; CPython allows it from a 'line' event of a
    trace function. From Python 3.12 on, it binds None to locals of the caller that are still
    unbound (Python's own rule for jumps; its warning is left out here). Returns what
    `restore_tracing` needs to put back."""
    saved = (sys.gettrace(), frame.f_trace, frame.f_trace_opcodes)

    def jump(fr, event, _arg):
        if event != "line" or fr.f_lineno <= header_end:  # the `as` target may have a line of its own
            return jump
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                fr.f_lineno = line
        except ValueError as e:
            restore_tracing(fr, saved)
            raise NNPatchError(
                f"{fr.f_code.co_filename}:{line}: the trace body ran up to this statement, but "
                f"Python refused to go on there ({e}). Set a flag in the body instead, and act on "
                "it after the with-block") from None
        restore_tracing(fr, saved)
        return saved[1]

    sys.settrace(lambda *_: None)
    frame.f_trace = jump
    frame.f_trace_opcodes = False
    return saved


class LeaveRewriter(ast.NodeTransformer):
    """`return`, `break` and `continue` that leave the trace body become `__nnpatch_leave__(line)`.

    Python runs the statement itself afterwards, at its own line of the caller's code (see
    `leave_body`), so it must be the only code on its line, and not inside a construct that keeps
    something on the interpreter's stack or would run twice (a `for` loop for `return`, an inner
    `with`, a `try` with `finally`, an `except` clause); a `return` value is evaluated by the
    caller after the trace, so it cannot use module values or `.save()`.
    """

    def __init__(self, node: ast.With, filename: str):
        self.filename = filename
        self.in_loop = False
        self.blocked: str | None = None  # the construct no leave can cross
        self.loop: str | None = None  # the loop a `return` cannot cross (it holds an iterator)
        self.lines: set[int] = set()
        self.code_at: dict[int, list[ast.AST]] = {}  # line -> simple statements and expressions on it
        for stmt in node.body:
            for n in ast.walk(stmt):
                if isinstance(n, ast.expr) or (isinstance(n, ast.stmt) and not _compound(n)):
                    for line in range(n.lineno, (n.end_lineno or n.lineno) + 1):
                        self.code_at.setdefault(line, []).append(n)

    def _within(self, body: list, *, loop: bool | None = None, blocked: str | None = None,
                iterator: str | None = None) -> list:
        saved = self.in_loop, self.blocked, self.loop
        if loop is not None:
            self.in_loop = loop
        self.blocked = self.blocked or blocked
        self.loop = self.loop or iterator
        try:
            return [self.visit(stmt) for stmt in body]
        finally:
            self.in_loop, self.blocked, self.loop = saved

    def visit_FunctionDef(self, node):  # its own returns
        return node

    visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = visit_FunctionDef

    def visit_For(self, node):
        node.body = self._within(node.body, loop=True, iterator="a `for` loop")
        node.orelse = self._within(node.orelse)  # a break in a loop's else leaves the loop around it
        return node

    visit_AsyncFor = visit_For

    def visit_While(self, node):
        node.body = self._within(node.body, loop=True)
        node.orelse = self._within(node.orelse)
        return node

    def visit_With(self, node):
        if invoke_with(node):
            node.body = self._within(node.body, blocked="an invoke block")
        elif steps_with(node):  # a loop over generation steps (see _Rewriter.visit_With)
            node.body = self._within(node.body, loop=True, iterator="a step loop")
        else:
            node.body = self._within(node.body, blocked="a `with` block")
        return node

    visit_AsyncWith = visit_With

    def visit_Try(self, node):
        final = "a `try` with `finally`" if node.finalbody else None
        node.body = self._within(node.body, blocked=final)
        node.handlers = [self._handler(h) for h in node.handlers]
        node.orelse = self._within(node.orelse, blocked=final)
        node.finalbody = self._within(node.finalbody, blocked="a `finally` clause")
        return node

    visit_TryStar = visit_Try

    def _handler(self, handler):
        handler.body = self._within(handler.body, blocked="an `except` clause")
        return handler

    def visit_Match(self, node):
        for case in node.cases:
            case.body = self._within(case.body, blocked="a `match` statement")
        return node

    def visit_Return(self, node):
        return self._leave(node, "return")

    def visit_Break(self, node):
        return node if self.in_loop else self._leave(node, "break")

    def visit_Continue(self, node):
        return node if self.in_loop else self._leave(node, "continue")

    def _leave(self, node, word: str):
        where = f"{self.filename}:{node.lineno}"
        fix = f"set a flag in the body and `{word}` after the with-block"
        blocked = self.blocked or (self.loop if word == "return" else None)
        if sys.version_info < (3, 11):
            raise NNPatchError(f"{where}: `{word}` leaving a trace body needs Python 3.11 or newer; "
                               f"on Python {sys.version_info[0]}.{sys.version_info[1]}, {fix}")
        if blocked:
            raise NNPatchError(
                f"{where}: `{word}` inside {blocked} cannot leave a trace body (nnpatch runs the "
                f"body itself, then lets Python run the `{word}`, which it cannot do from there): "
                f"{fix}")
        inside = set(ast.walk(node))
        if any(n not in inside for n in self.code_at.get(node.lineno, ())):
            raise NNPatchError(f"{where}: put the `{word}` that leaves this trace body on a line "
                               "of its own (Python resumes at that line after the trace)")
        if isinstance(node, ast.Return) and node.value is not None:
            used = next((n.attr for n in ast.walk(node.value) if isinstance(n, ast.Attribute)
                         and n.attr in TRACE_ONLY), None)
            if used:
                value = ast.unparse(node.value)
                raise NNPatchError(
                    f"{where}: `return {value}` leaves a trace body, and Python evaluates the "
                    f"value after the trace, where `.{used}` means nothing: assign it in the body "
                    f"(`value = {value}`), then `return value`")
        self.lines.add(node.lineno)
        return at(ast.Expr(name_call(LEAVE, [ast.Constant(node.lineno)])), node)


# What only means something inside a trace: a `return` value, computed after it, cannot use these.
TRACE_ONLY = frozenset({"save", "output", "input", "inputs", "grad", "backward", "skip", "stop"})


def _compound(stmt: ast.stmt) -> bool:
    return isinstance(stmt, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith,
                             ast.Try, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or \
        type(stmt).__name__ in ("Match", "TryStar")
