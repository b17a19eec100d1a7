"""The package's own import graph: dependencies point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import smap_notify

PACKAGE = Path(smap_notify.__file__).parent


def imports_within_package() -> dict[str, set[str]]:
    """Each module of smap_notify and the modules of smap_notify it imports, at any
    depth of its code (a deferred import inside a function counts too)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "smap_notify."
            ):
                deps.add(node.module.split(".")[1])  # type: ignore[union-attr]
        graph[path.stem] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                found.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        state[module] = "done"
        stack.pop()

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_package_has_no_import_cycle() -> None:
    graph = imports_within_package()
    assert {"app", "entry", "cli", "hub", "subscriber"} <= graph.keys()
    assert "cli" in graph["entry"]  # deferred imports are seen
    assert cycles(graph) == []
