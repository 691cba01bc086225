"""The project's size rules, checked with ast: no module of a package over 400 lines, no function over 60."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

from tests.helpers import REPO

PACKAGES = ("common", "model", "data_pipeline", "train", "launch")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def package_modules() -> List[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def long_functions(path: Path, limit: int) -> List[str]:
    """'module:function (N lines)' for every function or method longer than `limit` lines (decorators excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def test_the_checks_see_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    sample = tmp_path / "sample.py"
    sample.write_text(f"def short():\n    return 1\n\n\ndef too_long():\n{body}\n", encoding="utf-8")
    assert long_functions(sample, MAX_FUNCTION_LINES) == [f"sample.py:too_long ({MAX_FUNCTION_LINES + 1} lines)"]
    assert len(package_modules()) > 40  # the walk finds the packages' modules


def test_no_module_over_400_lines():
    too_long = [f"{p.relative_to(REPO)} ({n} lines)" for p in package_modules()
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert too_long == [], "split these modules: " + ", ".join(too_long)


def test_no_function_over_60_lines():
    too_long = [entry for p in package_modules() for entry in long_functions(p, MAX_FUNCTION_LINES)]
    assert too_long == [], "split these functions: " + ", ".join(too_long)
