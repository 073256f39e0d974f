"""`.source`: read and edit the values a module's forward computes between its input and output.

`model.transformer.h[0].attn.source` lists the operations of the attention's `forward`, read from
its source code; inside a trace, `...attn.source.attention_interface_1.output` is that invoke's rows
of what that call returned (with eager attention, the attention output and the attention weights
[batch, heads, query, key]), and assigning it, or editing it in place, changes what the forward
computes after it.

Operations are named as in nnsight: every call is `{callee}_{n}`, the callee's dotted name joined
with `_` (`self.c_attn(...)` is `self_c_attn`, `torch.matmul(...)` is `torch_matmul`; subscripts
are left out; a call on a computed value takes the attribute names only, `(a @ b).sum()` is `sum`),
and every plain assignment `x = value` is `x_{n}`; `n` counts one name's occurrences in the order
they run (a call's arguments before the call, an assignment's value before its name).

How: the forward's source is parsed, every call and assigned value is wrapped in a call to a
hand-off function, and the result is compiled with the forward's own file, line numbers, globals
and closure (decorators such as transformers' `deprecate_kwarg` are rebuilt around it). For the
duration of a forward pass in which an invoke waits for one of its operations, the module gets
that function as its instance-level `forward` (removed in the pass's `finally`, with the skip
gates); outside such a pass the module runs its own forward untouched.

Not covered: an operation's `.input` and `.skip`, the `.source` of an operation (of a function the
forward calls, such as `eager_attention_forward`), and forwards without Python source.

Example:
    >>> import torch, nnpatch
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(3, 3)
    ...     def forward(self, x):
    ...         h = torch.relu(self.fc(x))
    ...         return h * 2
    >>> net = nnpatch.Model(Net())
    >>> net.source.names
    ['self_fc_0', 'torch_relu_0', 'h_0']
"""
from __future__ import annotations

import ast
import difflib
import inspect
import textwrap
import types

from ..errors import NNPatchAttributeError, NNPatchError
from .batching import map_tensors
from .skip import ForwardRestore

OP = "__nnpatch_op__"


class Source:
    """`envoy.source`: the operations of a module's forward, by name."""

    def __init__(self, envoy):
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "_compiled", compiled(type(envoy._module).forward, envoy._path))

    @property
    def names(self) -> list[str]:
        return list(self._compiled.names)

    def __getattr__(self, name: str) -> "Operation":
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._compiled.names:
            close = difflib.get_close_matches(name, self._compiled.names, n=4, cutoff=0.4)
            hint = f"did you mean {', '.join(close)}?" if close else f"it has {', '.join(self._compiled.names[:10])}"
            raise NNPatchAttributeError(
                f"{self._envoy._path or 'model'}.source has no operation {name!r}; {hint} "
                f"(print({self._envoy._path or 'model'}.source) lists them with their lines)")
        return Operation(self._envoy, name)

    def __dir__(self):
        return self.names

    def __repr__(self) -> str:
        lines = [f"{self._envoy._path or 'model'}.source ({type(self._envoy._module).__name__}.forward):"]
        width = max((len(n) for n in self._compiled.names), default=0)
        for name in self._compiled.names:
            lines.append(f"  {name:<{width}}  line {self._compiled.lines[name]}: {self._compiled.text[name]}")
        return "\n".join(lines)


class Operation:
    """One operation of a module's forward: `.output` reads and sets its value."""

    def __init__(self, envoy, name: str):
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "_name", name)

    def _event(self, inv):
        kind = f"source.{self._name}.output"
        at = getattr(inv, "at", None)  # an invoke whose reads bind to a generation step
        return at(self._envoy._path, kind) if at is not None else (self._envoy._path, kind)

    @property
    def output(self):
        envoy = self._envoy
        inv = envoy._invoke()
        if envoy._of is None or envoy._of is inv:
            return inv.value(self._event(inv))
        return inv.value_of(envoy._of, self._event(inv))

    def __setattr__(self, name, value):
        envoy = self._envoy
        if name != "output":
            raise NNPatchAttributeError(f"only .output of {envoy._path}.source.{self._name} can be set")
        inv = envoy._invoke()
        if envoy._of is not None and envoy._of is not inv:
            raise NNPatchAttributeError("another invoke's source values are read-only here")
        inv.set_value(self._event(inv), value)

    def __repr__(self) -> str:
        return f"<Operation {self._envoy._path}.source.{self._name}>"


def is_source_event(event) -> bool:
    return event[1].startswith("source.")


def install(pass_, path: str, fresh) -> None:
    """Give the module at `path` its instrumented forward for this forward pass: each operation
    is handed to the pass (`fresh` copies it, as module values are) when an invoke waits for it."""
    key = "source:" + path
    if key in pass_.gates:
        return
    module = pass_.model._resolve(path)
    result = compiled(type(module).forward, path)

    def op(name, value):
        event = pass_.event_now(path, f"source.{name}.output")
        if pass_._ignores(event):
            return value
        return pass_._dispatch(event, map_tensors(fresh, value))

    forward = result.build(op)
    pass_.gates[key] = ForwardRestore(module)  # removed with the pass's hooks
    module.forward = types.MethodType(forward, module)


# -- compiling an instrumented forward --------------------------------------------------------------

class Compiled:
    """A forward rewritten with hand-offs, and its operations' names, lines and text."""

    def __init__(self, func, code, names, lines, text, chain):
        self.func, self.code, self.names, self.lines, self.text, self.chain = func, code, names, lines, text, chain

    def build(self, op):
        """The instrumented forward, handing operations to `op`, inside the original decorators."""
        cells = dict(zip(self.func.__code__.co_freevars, self.func.__closure__ or ()))
        cells[OP] = types.CellType(op)
        closure = tuple(cells[name] for name in self.code.co_freevars)
        fn = types.FunctionType(self.code, self.func.__globals__, self.func.__name__,
                                self.func.__defaults__, closure)
        fn.__kwdefaults__ = self.func.__kwdefaults__
        for wrapper, index in reversed(self.chain):  # put the decorators back around it
            cells = list(wrapper.__closure__)
            cells[index] = types.CellType(fn)
            fn = types.FunctionType(wrapper.__code__, wrapper.__globals__, wrapper.__name__,
                                    wrapper.__defaults__, tuple(cells))
            fn.__kwdefaults__ = wrapper.__kwdefaults__
        return fn


_COMPILED: dict = {}


def compiled(forward, path: str) -> Compiled:
    found = _COMPILED.get(forward)
    if found is None:
        found = _COMPILED[forward] = _compile(forward, path)
    return found


def _compile(forward, path: str) -> Compiled:
    func, chain = forward, []
    while hasattr(func, "__wrapped__"):  # decorators made with functools.wraps
        inner = func.__wrapped__
        index = next((i for i, c in enumerate(func.__closure__ or ()) if _holds(c, inner)), None)
        if index is None:
            raise NNPatchError(
                f"{path}.source: the forward of {forward.__qualname__} is wrapped by a decorator that "
                "does not hold the function it wraps, so nnpatch cannot rebuild it around an "
                "instrumented forward")
        chain.append((func, index))
        func = inner
    try:
        lines, first = inspect.getsourcelines(func)
    except (OSError, TypeError):
        raise NNPatchError(f"{path}.source: {func.__qualname__} has no Python source to read") from None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        raise NNPatchError(f"{path}.source: {func.__qualname__} is not a plain function definition")
    node.decorator_list = []
    namer = _Instrument()
    node.body = [namer.visit(stmt) for stmt in node.body]
    freevars = [OP] + [n for n in func.__code__.co_freevars if n != OP]
    shell = ast.FunctionDef(
        name="__nnpatch_shell__", args=ast.arguments(
            posonlyargs=[], args=[ast.arg(arg=n) for n in freevars], kwonlyargs=[], kw_defaults=[],
            defaults=[]),
        body=[node, ast.Return(ast.Name(node.name, ast.Load()))], decorator_list=[], type_params=[])
    module = ast.Module(body=[shell], type_ignores=[])
    ast.fix_missing_locations(module)
    ast.increment_lineno(module, first - 1)
    code = compile(module, func.__code__.co_filename, "exec")
    shell_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    inner = next(c for c in shell_code.co_consts if isinstance(c, types.CodeType) and c.co_name == node.name)
    source_lines = textwrap.dedent("".join(lines)).splitlines()
    text = {name: source_lines[line - 1].strip()[:70] for name, line in namer.lines.items()}
    lines_in_file = {name: line + first - 1 for name, line in namer.lines.items()}
    return Compiled(func, inner, namer.names, lines_in_file, text, chain)


def _holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


class _Instrument(ast.NodeTransformer):
    """Wraps every call and every assigned value in `__nnpatch_op__("name_n", value)`."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.names: list[str] = []
        self.lines: dict[str, int] = {}

    def _wrap(self, name: str, value: ast.expr, at: ast.AST) -> ast.expr:
        n = self.counts.get(name, 0)
        self.counts[name] = n + 1
        label = f"{name}_{n}"
        self.names.append(label)
        self.lines[label] = at.lineno
        call = ast.Call(func=ast.Name(OP, ast.Load()), args=[ast.Constant(label), value], keywords=[])
        return ast.copy_location(call, at)

    def visit_Call(self, node: ast.Call):
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not node.args:
            return node  # zero-argument super() needs its own frame
        self.generic_visit(node)  # the callee's and the arguments' calls run first
        parts, _ = _dotted(node.func)
        return self._wrap("_".join(parts) or "call", node, node)

    def visit_Assign(self, node: ast.Assign):
        node.value = self.visit(node.value)
        node.targets = [self.visit(t) for t in node.targets]
        if len(node.targets) == 1:
            node.value = self._bound(node.targets[0], node.value, node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign):
        if node.value is not None:
            node.value = self._bound(node.target, self.visit(node.value), node)
        return node

    def _bound(self, target, value, at):
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)):
            if len(target.elts) == len(value.elts) and not any(
                    isinstance(e, ast.Starred) for e in [*target.elts, *value.elts]):
                value.elts = [self._bound(t, v, at) for t, v in zip(target.elts, value.elts)]
            return value
        parts, named = _dotted(target)
        return self._wrap("_".join(parts), value, at) if named else value


def _dotted(expr) -> tuple[list[str], bool]:
    """The names along an attribute chain (subscripts skipped), and whether a name roots it."""
    parts = []
    while True:
        if isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        elif isinstance(expr, ast.Subscript):
            expr = expr.value
        elif isinstance(expr, ast.Name):
            parts.append(expr.id)
            return parts[::-1], True
        else:
            return parts[::-1], False
