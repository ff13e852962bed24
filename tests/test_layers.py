"""The runtime package's imports point one way (the README's Architecture section): a module
imports only modules of its own layer or below, no two modules import each other in a circle,
no private name crosses a module boundary, and project imports sit at module top (the CLI's lazy
entry into the optional lab is the one exception)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "merge_graphs"

#: Bottom to top. A module (or package) imports from its own layer or those below.
LAYERS = [
    ["errors", "tensors", "memory", "assignment", "parameters", "vocabulary", "modules"],
    ["io"],
    ["symmetry", "graph", "sources"],
    ["gnn", "match", "activations", "sampled_text", "rotation", "learned", "fusion", "evaluate"],
    ["aligners"],
    ["methods", "verify", "slices", "engine"],
    ["recipe", "api"],
    ["run"],
    ["cli", "__init__"],
    ["lab"],
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
#: Imports inside functions allowed: the optional lab, entered from the CLI.
LAZY = {("cli", "lab")}


def top(module: str) -> str:
    """``merge_graphs.io.writer`` -> ``io``; ``merge_graphs`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def runtime_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path):
    """``(imported module, names, inside a function)`` for every import of the package in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "merge_graphs":
            yield node.module, [a.name for a in node.names], id(node) in nested
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "merge_graphs":
                    yield alias.name, [], id(node) in nested


def test_every_runtime_module_has_a_layer():
    assert {top(module_name(p)) for p in runtime_modules()} <= set(RANK)


@pytest.mark.parametrize("path", runtime_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_stay_at_the_top_and_use_public_names(path):
    here = top(module_name(path))
    for module, names, lazy in project_imports(path):
        there = top(module)
        if there == "__init__" and names:
            there = next((top(f"merge_graphs.{n}") for n in names if f"merge_graphs.{n}" in _modules()), there)
        if lazy and (here, there) in LAZY:
            continue
        assert RANK[there] <= RANK[here], f"{path.name} ({here}) imports {module} ({there}), a higher layer"
        assert not lazy, f"{path.name} imports {module} inside a function"
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{path.name} imports private {private} from {module}"


def _modules() -> set[str]:
    return {module_name(p) for p in runtime_modules()}


def test_no_import_circles():
    graph = {module_name(p): {m for m, _, lazy in project_imports(p) if not lazy} for p in runtime_modules()}
    known = set(graph)
    graph = {m: {d for d in deps if d in known and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                pytest.fail(f"import circle: {' -> '.join(stack[stack.index(d):] + [d])}")
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
