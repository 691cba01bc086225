"""The packages import in one direction (common <- model <- data_pipeline <- train <- launch, bench on top), and
no package has an import cycle among its own modules. Checked with ast over every module, imports inside
functions included."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

from tests.helpers import REPO

LAYERS = ("common", "model", "data_pipeline", "train", "launch", "bench")
"""Bottom to top: each may import only those before it (and itself)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, known: Set[str]) -> Set[str]:
    """Our modules that `path` imports (`from a.b import c` counts as a.b.c when that is a module, else a.b)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: Set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {name for name in found if name.split(".")[0] in LAYERS}


def import_graph(roots=LAYERS) -> Dict[str, Set[str]]:
    paths = [p for root in roots for p in (REPO / root).rglob("*.py")]
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) & known for p in paths}


def layering_violations(graph: Dict[str, Set[str]]) -> List[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if rank[target.split(".")[0]] > rank[module.split(".")[0]]
    )


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Each strongly connected set of modules of one package (Tarjan), skipping a package's own __init__ re-exports."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def edges(module: str) -> Set[str]:
        return {t for t in graph.get(module, ()) if t.split(".")[0] == module.split(".")[0] and t != module}

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges(module):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_checks_see_a_violation_and_a_cycle():
    graph = {"model.a": {"train.b"}, "train.b": {"train.c"}, "train.c": {"train.b"}, "common.x": set()}
    assert layering_violations(graph) == ["model.a imports train.b"]
    assert cycles(graph) == [["train.b", "train.c"]]
    assert len(import_graph()) > 40  # the walk finds the packages' modules


def test_packages_import_downward_only():
    violations = layering_violations(import_graph())
    assert violations == [], "imports against the layering: " + "; ".join(violations)


def test_no_import_cycle_inside_a_package():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
