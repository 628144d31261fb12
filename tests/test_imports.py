"""The package's import graph: no cycle between modules (function-level imports count too) nor
between the package's parts (subpackages and top-level modules), nothing imported from recipes/,
tools/ or tests/, and the bench workers free of torch and transformers.

    python -m pytest -q tests/test_imports.py

STYLE.md 9: imports flow one way (cli → stages → features → runtimes/sources → recipe/errors).
The graph is read from the source with `ast`, so an import inside a function, which runs only
sometimes, is an edge like any other.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "edgedistill"
ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / PACKAGE
OUTSIDE_LIBRARY = ("recipes", "tools", "tests")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(LIBRARY.rglob("*.py"))}


def _imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package whose code `module` runs by its imports, at any level.

    `import a.b.c` and `from a.b import c` (c a submodule) run a.b.c and the packages above it;
    `from a.b import name` (name not a module) takes a name out of package a.b, an edge to a.b even
    when a.b is `module`'s own package. A package above `module` that is only passed through is
    no edge: Python has already started it before `module`. Relative imports are resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            submodules = {f"{origin}.{alias.name}" for alias in node.names} & modules.keys()
            targets |= submodules
            if len(submodules) < len(node.names):
                targets.add(origin)
    ancestors = _with_parents(module, modules)
    edges = set()
    for name in targets:
        edges |= {name} & modules.keys()
        edges |= _with_parents(name, modules) - ancestors
    return edges - {module}


def _with_parents(name: str, modules: dict[str, Path]) -> set[str]:
    """The modules that importing `name` runs: it and every package above it."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: _imported_modules(module, path, modules) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None: a depth-first search for a back edge."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles found one at a time, each broken (its closing edge removed) before looking again."""
    graph = {node: set(targets) for node, targets in graph.items()}
    cycles = []
    while (cycle := find_cycle(graph)) is not None:
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return cycles


@pytest.mark.unit
def test_finds_a_function_level_cycle():
    graph = {"edgedistill.a": {"edgedistill.b"}, "edgedistill.b": {"edgedistill.a"}, "edgedistill.c": set()}
    assert find_cycle(graph) == ["edgedistill.a", "edgedistill.b", "edgedistill.a"]
    assert find_cycle({"edgedistill.a": {"edgedistill.b"}, "edgedistill.b": set()}) is None


@pytest.mark.unit
def test_submodule_import_counts_its_parents():
    modules = _modules()
    assert _with_parents("edgedistill.runtimes.onnx.OnnxDecoder", modules) == {
        "edgedistill", "edgedistill.runtimes", "edgedistill.runtimes.onnx"}


@pytest.mark.unit
def test_the_library_has_no_import_cycle():
    cycles = all_cycles(import_graph())
    assert not cycles, "import cycles (each line one, a -> b meaning a imports b):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles)


@pytest.mark.unit
def test_the_library_parts_have_no_import_cycle():
    # parts: the top-level modules and subpackages; a bench worker living in runtimes/ would make
    # bench and runtimes import each other without any two modules doing so
    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    parts: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        parts.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    cycles = all_cycles(parts)
    assert not cycles, "import cycles between parts of the package:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.unit
def test_the_library_imports_nothing_from_recipes_tools_or_tests():
    found = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        names += [node.module for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and not node.level and node.module]
        found += [f"{module} imports {name}" for name in names if name.split(".")[0] in OUTSIDE_LIBRARY]
    assert not found, "\n".join(found)


@pytest.mark.integration
@pytest.mark.parametrize("module", ["edgedistill.bench.onnx_worker", "edgedistill.runtimes.onnx",
                                    "edgedistill.bench.worker"])
def test_bench_workers_import_neither_torch_nor_transformers(module):
    # the worker's peak RSS is what bench reports as the model's memory
    code = (f"import json, sys, {module}; "
            "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(done.stdout) == [], f"importing {module} loads {done.stdout.strip()}"
