"""The layout keeps its promises: no import circles in src/rnnlab; nothing in data/ reaches models/
(directly or through another module); models/ import nothing of tasks, training or tracking."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the project modules it imports (top-level and inside functions alike)."""
    modules = {}
    for file in src.rglob("*.py"):
        name = ".".join(file.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = file
    graph = {m: set() for m in modules}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_data_never_reaches_models():
    graph = import_graph()
    offenders = {
        m: sorted(w for w in reachable(graph, m) if w.startswith("rnnlab.models"))
        for m in graph
        if m.startswith("rnnlab.data")
    }
    assert {m: w for m, w in offenders.items() if w} == {}


def test_models_are_plain_modules():
    graph = import_graph()
    layers = ("rnnlab.tasks", "rnnlab.training", "rnnlab.tracking", "rnnlab.stages", "rnnlab.resume")
    offenders = {m: sorted(w for w in graph[m] if w.startswith(layers)) for m in graph if m.startswith("rnnlab.models")}
    assert {m: w for m, w in offenders.items() if w} == {}
