"""The package's import graph: no cycles between modules, and each folder imports only the layers
docs/architecture.md allows.

The graph is read statically from every `import` statement, including those inside functions (a
lazy import only hides a cycle until someone imports the modules in another order), but not those
under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import modiff_trt

PACKAGE = Path(modiff_trt.__file__).parent

#: Folder (or top-level module) -> what it may import besides itself; keep in sync with
#: docs/architecture.md. `errors` and the root `__init__` (`__version__`) are allowed everywhere.
ALLOWED: dict[str, set[str]] = {
    "atomic": set(),
    "choices": set(),
    "validate": set(),
    "quant": set(),
    "metrics": set(),
    "machine": set(),
    "devices": set(),
    "memory": {"models", "quant"},
    "plugins": set(),
    "models": {"sampling.schedules", "sampling.schedulers", "validate"},
    "sampling": {"atomic", "validate"},
    "training": {"atomic", "metrics", "models"},
    "export": {"atomic", "models", "quant", "sampling", "validate"},
    "calibrators": {"atomic", "export", "memory", "models", "quant", "sampling", "validate"},
    "engines": {"atomic", "calibrators", "devices", "export", "models", "quant", "sampling"},
    "pipeline": {"calibrators", "engines", "export", "metrics", "models", "quant", "sampling"},
    "demo": {"atomic", "engines", "machine", "metrics", "models", "pipeline", "quant", "sampling"},
    "api": {"*"},
    "cli": {"*"},
    "entry": {"cli"},
    "__main__": {"entry"},
}
EVERYWHERE = {"errors", "__init__"}

#: Cycles another change removes; delete an entry when its cycle is gone.
KNOWN_CYCLES: list[set[str]] = []


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)] = path
    return names


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module (relative to modiff_trt, the root package is `__init__`) -> modules it imports.

    `from pkg import sub` where `sub` is a module depends on `pkg.sub`, not on `pkg/__init__`:
    Python resolves it as the submodule, so it adds no edge to the package's own imports.
    """
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [s for s in subs if s.removeprefix("modiff_trt.") in modules]
                if len(targets) < len(subs):
                    targets.append(node.module)
            else:
                continue
            for target in targets:
                if target == "modiff_trt":
                    deps.add("__init__")
                elif target.startswith("modiff_trt."):
                    deps.add(target.removeprefix("modiff_trt."))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _unit(module: str) -> str:
    return module.split(".")[0]


def test_no_import_cycles():
    found = [c for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


def test_folders_import_only_the_layers_below():
    graph = import_graph()
    assert set(ALLOWED) | EVERYWHERE >= {_unit(m) for m in graph}, "a new folder needs an ALLOWED entry"
    wrong = []
    for module, deps in sorted(graph.items()):
        allowed = ALLOWED.get(_unit(module), set())
        for dep in sorted(deps):
            unit = _unit(dep)
            if unit in EVERYWHERE or unit == _unit(module) or "*" in allowed:
                continue
            if unit not in allowed and dep not in allowed:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layering of docs/architecture.md:\n" + "\n".join(wrong)


def test_the_graph_reader_sees_lazy_imports_and_cycles():
    """The checks above are only as good as the reader: a function-level import is an edge."""
    graph = import_graph()
    assert "models.ldm_loading" in graph["models.loading"]
    assert "sampling.text_encoder" in graph["sampling.conditioning"]  # imported inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
