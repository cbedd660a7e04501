"""llmbook's modules form layers: a lower module never imports a higher one, so no import circle.

Every import counts, also those inside functions (a deferred import hides a circle, not removes it).
"""

import ast
from pathlib import Path

import llmbook

PACKAGE = Path(llmbook.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The llmbook modules that the module at `path` imports, anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y  /  from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "llmbook":
                names = node.module.split(".")[1:2] or [a.name for a in node.names]
            else:
                continue
            found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("llmbook."))
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    return {name: imports_of(path) & set(modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert imports_of(PACKAGE / "train.py") >= {"checkpoint", "config", "data", "model"}


def test_llmbook_has_no_import_circle():
    graph = import_graph()
    assert len(graph) >= 10
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_base_modules_import_nothing_above_them():
    graph = import_graph()
    assert graph["errors"] == set() and graph["files"] <= {"errors"} >= graph["env"]
    assert graph["tokenizer"] <= {"env", "errors"}
    assert graph["model"] <= {"attention", "env", "errors", "files"}
    assert graph["quantize"] <= {"errors", "model"}  # on the model, below what uses models
    assert graph["export"] <= {"errors", "files", "model"}
    assert "cli" not in set().union(*graph.values())  # the command line sits on top
    assert {m for m, deps in graph.items() if "serve" in deps} <= {"cli"}  # the server below it
    assert {m for m, deps in graph.items() if "align" in deps} <= {"cli"}  # the top of training
    assert graph["serve"] <= {"env", "errors", "generate", "model", "pretrained", "tokenizer"}
    # the instructors' tools sit on the book runner and nothing else of the course
    assert graph["exercises"] <= {"book", "env", "errors"}
    assert graph["site"] <= {"book", "env", "errors"}
    assert {m for m, deps in graph.items() if deps & {"exercises", "site"}} <= {"cli"}
