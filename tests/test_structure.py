"""The package's modules import one another without a circle, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vae_dist"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The vae_dist modules that ``path`` imports anywhere in it (top level or inside a function)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "vae_dist":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from vae_dist import a, b
                found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vae_dist.")}
    return found & modules - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(u: str) -> list[str]:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return []

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_find_cycle_sees_a_circle():
    # The checker itself: a circle through a function-level import is one.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circle_inside_the_package():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {m: imports_of(PACKAGE / f"{m}.py", modules) for m in modules}
    assert graph["cli"], "the import scan found nothing: it no longer reads this package"
    assert find_cycle(graph) == []
