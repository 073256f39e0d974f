"""Small helpers for reading and writing the syntax trees of trace bodies (`source`, `leaving`)."""
from __future__ import annotations

import ast


def is_call_to(expr: ast.expr, name: str) -> bool:
    return (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute)
            and expr.func.attr == name)


def steps_with(node: ast.With) -> bool:
    """`with tracer.iter[...]:` or `with tracer.all():`, the block form of a step loop."""
    if len(node.items) != 1:
        return False
    expr = node.items[0].context_expr
    return ((isinstance(expr, ast.Subscript) and isinstance(expr.value, ast.Attribute)
             and expr.value.attr == "iter")
            or (is_call_to(expr, "all") and not expr.args and not expr.keywords))


def invoke_with(node) -> bool:
    return (isinstance(node, ast.With) and len(node.items) == 1
            and is_call_to(node.items[0].context_expr, "invoke"))


def name_call(name: str, args: list) -> ast.Call:
    return ast.Call(func=ast.Name(name, ast.Load()), args=args, keywords=[])


def at(new: ast.stmt, old: ast.AST) -> ast.stmt:
    """Give a generated statement the location of the user's statement it stands for."""
    return ast.fix_missing_locations(ast.copy_location(new, old))
