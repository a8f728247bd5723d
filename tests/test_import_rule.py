"""The import rule of docs/architecture.md, read from the source (every import statement,
those inside functions included): imports point down (orchestrator -> workloads ->
parallelism), no workload imports another, no module cycle, `parallelism/` and
`workloads/` import only torch, fsspec and numpy beside the standard library at module
level (they run on a GPU machine that has only PyTorch), and `orchestrator/` imports the
project's modules at the top."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("orchestrator", "workloads", "parallelism")  # each may import only those after it
MODULE_LEVEL_THIRD_PARTY = {"torch", "fsspec", "numpy"}  # numpy: torch's own dependency


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, inside a function) for every import statement of a file."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from the file's package up
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                    # "from . import x": x may be a module of the package
                    names = [f"{target}.{a.name}" for a in child.names] if not child.module else [target]
                else:
                    names = [child.module]
                out.extend((n, child.lineno, nested) for n in names)
            visit(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return out


def _files(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


def _project_modules() -> set[str]:
    return {_module(p) for layer in LAYERS for p in _files(layer)}


def test_imports_point_down_and_no_workload_imports_another():
    bad = []
    for i, layer in enumerate(LAYERS):
        above = LAYERS[:i]
        for path in _files(layer):
            here = _module(path)
            for name, line, _ in _imports(path):
                root = name.split(".")[0]
                if root in above:
                    bad.append(f"{here}:{line} imports {name} (a layer above)")
                if layer == "workloads":
                    mine, theirs = here.split(".")[1:2], name.split(".")[1:2]
                    if (root == "workloads" and mine and theirs and mine != theirs
                            and {mine[0], theirs[0]} <= {"v2pe", "piip"}):
                        bad.append(f"{here}:{line} imports {name} (another workload)")
    assert not bad, "\n".join(bad)


def test_no_module_level_cycle():
    known = _project_modules()
    graph = {}
    for layer in LAYERS:
        for path in _files(layer):
            deps = set()
            for name, _, nested in _imports(path):
                if nested:
                    continue
                while name and name not in known:  # "pkg.mod.attr" -> "pkg.mod"
                    name = name.rpartition(".")[0]
                if name and name != _module(path):
                    deps.add(name)
            graph[_module(path)] = deps
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]) if dep in path else f"{node} -> {dep}")
            elif dep not in state:
                walk(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert not cycles, "\n".join(cycles)


def test_gpu_side_layers_import_only_torch_at_module_level():
    bad = []
    for layer in ("workloads", "parallelism"):
        for path in _files(layer):
            for name, line, nested in _imports(path):
                root = name.split(".")[0]
                if nested or root in LAYERS or root == "__future__" or root in sys.stdlib_module_names:
                    continue
                if root not in MODULE_LEVEL_THIRD_PARTY:
                    bad.append(f"{_module(path)}:{line} imports {name} at module level")
    assert not bad, "\n".join(bad)


def test_the_orchestrator_imports_the_project_at_the_top():
    bad = [f"{_module(path)}:{line} imports {name} inside a function"
           for path in _files("orchestrator") for name, line, nested in _imports(path)
           if nested and name.split(".")[0] in LAYERS]
    assert not bad, "\n".join(bad)
