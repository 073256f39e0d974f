"""nnpatch's three layers import one way: engine <- patching <- jupyter.

Every import statement in the package is read from the source (module level and inside
functions alike), so a function-level import cannot hide a wrong-way dependency or a cycle.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "nnpatch"
LAYERS = ("engine", "patching", "jupyter")
# Third-party packages that only the jupyter layer may import.
DISPLAY = ("plotly", "IPython", "ipywidgets", "anywidget", "traitlets")
# The one call up the layers: PatchingResult.plot() draws with the jupyter layer's heatmap
# (which imports the result for annotations only, so this is no cycle).
ALLOWED_UPWARD = {("nnpatch.patching.result", "nnpatch.jupyter.heatmap")}
MAX_LINES = 500


def module_name(path: pathlib.Path) -> str:
    parts = ["nnpatch", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import in the file, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for n in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [alias.name for alias in node.names]
            # `from . import x` imports the submodule x when there is one
            subs = [f"{target}.{n}" for n in names if _is_module(f"{target}.{n}")]
            found += [(target, names)] + [(s, []) for s in subs]
    return found


def _is_type_checking(node) -> bool:
    """`if TYPE_CHECKING:` blocks hold imports for annotations only; they never run."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _is_module(dotted: str) -> bool:
    rel = pathlib.Path(*dotted.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(p): imports(p) for p in SOURCES}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "nnpatch" and parts[1] in LAYERS else None


def test_the_walk_sees_every_layer():
    assert {layer_of(m) for m in GRAPH} >= set(LAYERS)
    assert any(t == "nnpatch.jupyter.heatmap" for t, _ in GRAPH["nnpatch.patching.result"])


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_layers_import_only_downward(module):
    own = layer_of(module)
    if own is None:
        return
    rank = LAYERS.index(own)
    for target, _ in GRAPH[module]:
        other = layer_of(target)
        if other is not None and LAYERS.index(other) > rank:
            assert (module, target) in ALLOWED_UPWARD, f"{module} ({own}) imports {target} ({other})"
        if own != "jupyter":
            top = target.split(".")[0]
            assert top not in DISPLAY, f"{module} ({own}) imports {target}; only nnpatch.jupyter may"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_private_name_crosses_a_subpackage(module):
    own = module.split(".")[:2]
    for target, names in GRAPH[module]:
        if not target.startswith("nnpatch.") or target.split(".")[:2] == own:
            continue
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        private += [p for p in target.split(".") if p.startswith("_") and p != "__init__"]
        assert not private, f"{module} imports private {private} from {target}"


def test_no_import_cycles():
    edges = {m: {t for t, _ in deps if t in GRAPH and t != m} for m, deps in GRAPH.items()}
    # A package's __init__ re-exporting its own modules is not a cycle through them.
    for m in edges:
        edges[m] = {t for t in edges[m] if not (m.startswith(t + ".") and t in GRAPH)}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t] if t in path else [m, t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_engine_alone_does_not_load_the_upper_layers():
    import subprocess
    import sys
    code = ("import sys, nnpatch.engine\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('nnpatch.patching', 'nnpatch.jupyter', "
            "'plotly', 'IPython', 'ipywidgets')))\n"
            "assert not loaded, loaded\n"
            "import nnpatch\n"
            "assert not any(m.startswith(('nnpatch.jupyter', 'plotly')) for m in sys.modules)\n"
            "assert sys.excepthook is sys.__excepthook__, 'import nnpatch changed sys.excepthook'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_readable_in_one_sitting(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
