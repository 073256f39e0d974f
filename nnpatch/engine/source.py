"""Taking over the body of a `with model.trace(...)` block from its source.

A trace body is not executed by Python as written. When the trace is entered we find the
with-statement in the caller's source, stop Python from running its body, and compile it
ourselves:

* each `with tracer.invoke(...):` block becomes its own code object, run later as a coroutine
  that meets the model's forward pass at the modules it reads;
* `x.save()` becomes `x`: every value a trace assigns survives it, so `.save()` (nnsight's
  spelling) is accepted on any value (floats, dicts) and costs nothing;
* `x.backward(...)`, `x.grad` and `x.grad = g` become calls into the gradient machinery;
* before each trace-level statement that reads a name an invoke assigns, the pending invokes are
  run (one batched forward pass), so such statements see the invokes' results;
* a `return`, `break` or `continue` that leaves the body becomes `__nnpatch_leave__(line)`: the
  body ends there, and Python then runs the caller's own code for that statement (`leaving`).

Line numbers and file names are kept, so errors point at the user's own lines.
"""
from __future__ import annotations

import ast
import linecache
import sys
import types
import weakref
from dataclasses import dataclass, field

from ..errors import NNPatchError
from .leaving import LeaveRewriter
from .syntax import at, invoke_with, is_call_to, name_call, steps_with

TRACER = "__nnpatch_tracer__"
BACKWARD = "__nnpatch_backward__"
GET_GRAD = "__nnpatch_grad__"
SET_GRAD = "__nnpatch_set_grad__"
FINAL = "__nnpatch_final__"


@dataclass
class InvokeBody:
    code: types.CodeType
    stores: frozenset[str]  # names the body assigns at its own scope
    reads: frozenset[str] = frozenset()  # names the body (or code nested in it) reads


@dataclass
class TraceProgram:
    code: types.CodeType  # the trace body, invoke blocks replaced by registrations
    invokes: list[InvokeBody] = field(default_factory=list)
    uses_grad: bool = False
    target: str | None = None  # the name of `with model.trace(...) as <target>`
    target_names: tuple[str, ...] = ()  # every name bound by the `as` target (a tuple for model.edit())
    globals: frozenset[str] = frozenset()  # names the body declares global
    leaves: frozenset[int] = frozenset()  # lines of the `return`/`break`/`continue` that leave it
    header_end: int = 0  # the last line of the with-statement's header; the body starts below


class Skip(BaseException):
    """Raised as the with-block is entered, so that Python does not run the trace body itself.
    A BaseException, so that no `except Exception:` of the user's can catch it."""


# -- stopping Python from running the with-body -----------------------------------------------

def skip_body(frame: types.FrameType):
    """Arrange for the caller's next instruction, the first one protected by the with-statement,
    to raise Skip. Returns what `restore_tracing` needs to put back."""
    saved = (sys.gettrace(), frame.f_trace, frame.f_trace_opcodes)

    def raise_skip(*_):
        raise Skip

    sys.settrace(lambda *_: None)
    frame.f_trace = raise_skip
    frame.f_trace_opcodes = True  # the line of the body's first statement may be unprotected
    return saved


# -- finding the body -------------------------------------------------------------------------

_PARSED: dict[tuple[str, int], ast.Module] = {}
_PROGRAMS: dict[tuple, TraceProgram] = {}


def source_of(frame: types.FrameType) -> tuple[str, str]:
    filename = frame.f_code.co_filename
    lines = linecache.getlines(filename, frame.f_globals)
    if not lines:
        raise NNPatchError(
            f"nnpatch reads a trace's body from its source, and {filename!r} has none (code run "
            "with exec() of a string, or typed into a bare interpreter). Write the trace in a "
            "file or a notebook cell, or compile the string with nnpatch.engine.compile_source("
            "source, filename) before exec().")
    return filename, "".join(lines)


def compile_source(source: str, filename: str = "<nnpatch>", mode: str = "exec") -> types.CodeType:
    """Compile a string whose traces nnpatch can read: registers the source in linecache.

    Example:
        >>> code = compile_source("x = 1\\n", "<cell-1>")
        >>> exec(code, {})
    """
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return compile(source, filename, mode)


_BY_CODE: "weakref.WeakKeyDictionary[types.CodeType, dict]" = weakref.WeakKeyDictionary()


def trace_program(frame: types.FrameType, implicit_invoke: bool) -> TraceProgram:
    """The compiled program of the trace whose `with` statement `frame` is executing."""
    # A code object's source cannot change, so programs are kept per code object and line.
    per_code = _BY_CODE.get(frame.f_code)  # get first: setdefault builds a weak reference
    if per_code is None:
        per_code = _BY_CODE.setdefault(frame.f_code, {})
    program = per_code.get((frame.f_lineno, implicit_invoke))
    if program is None:
        program = per_code[(frame.f_lineno, implicit_invoke)] = _program_from_source(frame, implicit_invoke)
    return program


def _program_from_source(frame: types.FrameType, implicit_invoke: bool) -> TraceProgram:
    filename, source = source_of(frame)
    lineno = frame.f_lineno
    key = (filename, hash(source), lineno, implicit_invoke)
    program = _PROGRAMS.get(key)
    if program is None:
        tree = _PARSED.get((filename, hash(source)))
        if tree is None:
            try:
                tree = _PARSED[(filename, hash(source))] = ast.parse(source, filename)
            except SyntaxError as e:
                raise NNPatchError(
                    f"nnpatch reads a trace's body from its source, but the source it finds for "
                    f"{filename!r} is not the code that is running ({e.msg}, line {e.lineno}): the "
                    "file changed since it was loaded, or a string was exec'd under a file's name. "
                    "Compile such strings with nnpatch.engine.compile_source(source, filename)."
                ) from None
        node = _find_with(tree, lineno, filename)
        _check_running_code(node, frame.f_code, filename)
        program = _PROGRAMS[key] = _compile_trace(node, filename, implicit_invoke, _class_of(frame.f_code))
    return program


def _check_running_code(node: ast.With, code: types.CodeType, filename: str) -> None:
    """Refuse a body whose source is not the code that is running (a file edited after it was
    imported): its statements must stand on lines the running code has, and use its names."""
    lines = {line for _, _, line in code.co_lines() if line is not None}
    names = set(code.co_names) | set(code.co_varnames) | set(code.co_cellvars) | set(code.co_freevars)
    body_lines = range(node.body[0].lineno, (node.end_lineno or node.lineno) + 1)
    spans: set[int] = set()
    problem = None
    for stmt in node.body:
        for n in _own_code(stmt):
            if isinstance(n, ast.stmt):
                spans.update(range(n.lineno, (n.end_lineno or n.lineno) + 1))
                silent = isinstance(n, (ast.Pass, ast.Global, ast.Nonlocal, ast.FunctionDef,
                                        ast.AsyncFunctionDef, ast.ClassDef)) or (
                    isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
                if not silent and n.lineno not in lines:
                    problem = f"line {n.lineno} has no code in the running program"
            elif isinstance(n, ast.Name) and n.id not in names and not n.id.startswith("__"):
                problem = f"the name {n.id!r} is not in the running program"
    extra = sorted(line for line in lines if line in body_lines and line not in spans)
    if extra:
        problem = f"the running program has code on line {extra[0]}, which the source does not"
    if problem:
        raise NNPatchError(
            f"{filename} changed since it was loaded ({problem}), so nnpatch cannot read this "
            "trace's body from it: reload the module (importlib.reload) or restart Python")


def _own_code(node):
    """The nodes whose code runs in the enclosing code object: not the bodies of functions,
    lambdas, classes and comprehensions, which compile to code objects of their own."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(getattr(n, "decorator_list", []))
            todo.extend(d for d in n.args.defaults + n.args.kw_defaults if d is not None)
        elif isinstance(n, ast.ClassDef):
            todo.extend(n.decorator_list + n.bases + [k.value for k in n.keywords])
        elif not isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            todo.extend(ast.iter_child_nodes(n))


def _class_of(code: types.CodeType) -> str | None:
    """The class whose body encloses a function's code (for private-name mangling), if any."""
    parts = getattr(code, "co_qualname", code.co_name).split(".")[:-1]
    while parts and parts[-1] == "<locals>":
        parts = parts[:-2]
    return parts[-1] if parts else None


def _find_with(tree: ast.Module, lineno: int, filename: str) -> ast.With:
    best = None
    for node in ast.walk(tree):
        if not isinstance(node, (ast.With, ast.AsyncWith)):
            continue
        for item in node.items:
            expr = item.context_expr
            if expr.lineno <= lineno <= (expr.end_lineno or expr.lineno) and _is_body_call(expr):
                if best is None or node.lineno >= best.lineno:
                    best = node
    if best is None:
        raise NNPatchError(
            f"could not find the `with ....trace(...)` statement at {filename}:{lineno}: open "
            "traces with a with-statement written in the source. If it is there, the file "
            "changed since it was loaded: reload the module (importlib.reload) or restart Python")
    if best.body and best.body[0].lineno == best.lineno:
        raise NNPatchError(
            f"{filename}:{lineno}: put the body of a trace on its own lines, below the with-statement")
    return best


# The with-statements whose body nnpatch takes over: traces, generations, scans and edits.
BODY_CALLS = ("trace", "generate", "scan", "edit")


def _is_body_call(expr: ast.expr) -> bool:
    return any(is_call_to(expr, name) for name in BODY_CALLS)


# -- compiling --------------------------------------------------------------------------------

def _compile_trace(node: ast.With, filename: str, implicit_invoke: bool, owner: str | None) -> TraceProgram:
    uses_grad = any(_uses_grad(stmt) for stmt in node.body)
    leaves = LeaveRewriter(node, filename)
    body = [_Rewriter().visit(leaves.visit(stmt)) for stmt in node.body]
    if owner is not None and owner.strip("_"):
        body = [_Mangler(owner).visit(stmt) for stmt in body]
    target = next((item.optional_vars for item in node.items if _is_body_call(item.context_expr)), None)
    declared = {name for stmt in body for n in _walk_scope(stmt) if isinstance(n, ast.Global) for name in n.names}
    program = TraceProgram(code=None, uses_grad=uses_grad,  # type: ignore[arg-type]
                           target=target.id if isinstance(target, ast.Name) else None,
                           target_names=tuple(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
                           if target is not None else (),
                           globals=frozenset(declared), leaves=frozenset(leaves.lines),
                           header_end=max(n.end_lineno or n.lineno for item in node.items
                                          for n in (item.context_expr, item.optional_vars) if n))
    if implicit_invoke:
        if any(invoke_with(n) for stmt in body for n in _walk_scope(stmt)):
            raise NNPatchError(
                f"{filename}:{node.lineno}: a trace given inputs is itself one invoke; either pass "
                "the inputs to model.trace(...) or use `with tracer.invoke(...)` blocks, not both")
        program.invokes.append(_invoke_body(body, filename))
        first = node.body[0]
        stmts = [at(_call_stmt("_invoke", [ast.Constant(None), ast.Constant(0)]), first),
                 at(_call_stmt("_flush", []), node.body[-1])]
    else:
        stmts = _split_invokes(body, program, filename)
        stmts.append(at(_call_stmt("_flush", []), node.body[-1]))
    module = ast.Module(body=stmts, type_ignores=[])
    ast.fix_missing_locations(module)
    program.code = compile(module, filename, "exec")
    return program


class _Mangler(ast.NodeTransformer):
    """Private names (`self.__h`) as Python mangles them inside class `owner`'s body."""

    def __init__(self, owner: str):
        self.prefix = "_" + owner.lstrip("_")

    def _mangle(self, name: str) -> str:
        if name.startswith("__") and not name.endswith("__") and "." not in name:
            return self.prefix + name
        return name

    def visit_Name(self, node):
        node.id = self._mangle(node.id)
        return node

    def visit_Attribute(self, node):
        self.generic_visit(node)
        node.attr = self._mangle(node.attr)
        return node

    def visit_arg(self, node):
        node.arg = self._mangle(node.arg)
        return node


def _split_invokes(stmts: list[ast.stmt], program: TraceProgram, filename: str) -> list[ast.stmt]:
    """Replace invoke blocks by registrations; flush before statements that need their results."""
    out: list[ast.stmt] = []
    for stmt in stmts:
        if any(invoke_with(n) for n in _walk_scope(stmt)):
            out.append(_ReplaceInvokes(program, filename).visit(stmt))
        else:
            names = sorted({n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)})
            flush = _call_stmt("_flush_if_needed", [ast.Tuple([ast.Constant(n) for n in names], ast.Load())])
            out.append(at(flush, stmt))
            out.append(stmt)
    return out


class _ReplaceInvokes(ast.NodeTransformer):
    def __init__(self, program: TraceProgram, filename: str):
        self.program, self.filename = program, filename

    def visit_FunctionDef(self, node):  # invokes inside helper functions are not ours
        return node

    visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = visit_FunctionDef

    def visit_With(self, node):
        if not invoke_with(node):
            return self.generic_visit(node)
        item = node.items[0]
        index = len(self.program.invokes)
        self.program.invokes.append(_invoke_body(node.body, self.filename))
        _check_target(item, self.filename)
        call = _tracer_call("_invoke", [item.context_expr, ast.Constant(index)])
        if item.optional_vars is not None:
            stmt = ast.Assign(targets=[item.optional_vars], value=call)
        else:
            stmt = ast.Expr(call)
        return at(stmt, node)


def _check_target(item: ast.withitem, filename: str) -> None:
    if item.optional_vars is not None and not isinstance(item.optional_vars, ast.Name):
        raise NNPatchError(f"{filename}:{item.optional_vars.lineno}: bind an invoke to a plain name")



def _invoke_body(stmts: list[ast.stmt], filename: str) -> InvokeBody:
    for stmt in stmts:
        for n in _walk_scope(stmt):
            if invoke_with(n):
                raise NNPatchError(f"{filename}:{n.lineno}: invokes cannot be nested inside invokes")
    module = ast.Module(body=_with_final_marks(stmts), type_ignores=[])
    ast.fix_missing_locations(module)
    reads = {n.id for stmt in stmts for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return InvokeBody(code=compile(module, filename, "exec"), stores=frozenset(_stored_names(stmts)),
                      reads=frozenset(reads))


def _with_final_marks(stmts: list[ast.stmt]) -> list[ast.stmt]:
    """After the last statement that assigns a name, mark the name final: another invoke that
    reads it gets the value it has from then on, never an earlier one."""
    last: dict[str, int] = {}
    for i, stmt in enumerate(stmts):
        for name in _stored_names([stmt]):
            last[name] = i
    out: list[ast.stmt] = []
    for i, stmt in enumerate(stmts):
        out.append(stmt)
        names = sorted(n for n, j in last.items() if j == i)
        if names:
            mark = ast.Expr(name_call(FINAL, [ast.Tuple([ast.Constant(n) for n in names], ast.Load())]))
            out.append(at(mark, stmt))
    return out


def _walk_scope(node):
    """ast.walk that does not enter nested functions, lambdas or classes."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        for child in ast.iter_child_nodes(n):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                todo.append(child)


def _stored_names(stmts: list[ast.stmt]) -> set[str]:
    names: set[str] = set()
    for stmt in stmts:
        for n in _walk_scope(stmt):
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                names.add(n.id)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, ast.alias):
                names.add((n.asname or n.name).split(".")[0])
            elif isinstance(n, ast.ExceptHandler) and n.name:
                names.add(n.name)
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
    # comprehension variables live in their own scope
    for stmt in stmts:
        for n in ast.walk(stmt):
            if isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                for gen in n.generators:
                    for t in ast.walk(gen.target):
                        if isinstance(t, ast.Name):
                            names.discard(t.id)
    return names


def _uses_grad(stmt: ast.stmt) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in ("grad", "backward") for n in ast.walk(stmt))


class _Rewriter(ast.NodeTransformer):
    """`.save()`, `.backward()`, `.grad` and `.grad = g` become calls into nnpatch."""

    def visit_With(self, node):
        """`with tracer.iter[...] as step:` runs its block once per step: it is the loop
        `for step in tracer.iter[...]:` (nnsight's older spelling of the same thing)."""
        self.generic_visit(node)
        if not steps_with(node):
            return node
        item = node.items[0]
        target = item.optional_vars or ast.Name("__nnpatch_step__", ast.Store())
        loop = ast.For(target=target, iter=item.context_expr, body=node.body, orelse=[])
        return ast.copy_location(loop, node)

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "save" and not node.args and not node.keywords:
            return f.value  # nothing to do: every value survives the trace (see the docstring)
        if isinstance(f, ast.Attribute) and f.attr == "backward":
            return ast.copy_location(
                ast.Call(func=ast.Name(BACKWARD, ast.Load()), args=[f.value] + node.args,
                         keywords=node.keywords), node)
        return node

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if node.attr == "grad" and isinstance(node.ctx, ast.Load):
            return ast.copy_location(name_call(GET_GRAD, [node.value]), node)
        return node

    def visit_Assign(self, node):
        self.generic_visit(node)
        if len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute) \
                and node.targets[0].attr == "grad":
            call = name_call(SET_GRAD, [node.targets[0].value, node.value])
            return ast.copy_location(ast.Expr(call), node)
        return node



def _tracer_call(method: str, args: list) -> ast.Call:
    return ast.Call(func=ast.Attribute(ast.Name(TRACER, ast.Load()), method, ast.Load()),
                    args=args, keywords=[])


def _call_stmt(method: str, args: list) -> ast.stmt:
    return ast.Expr(_tracer_call(method, args))
