"""The package's import graph (read from the source, function-level imports included): no circle, and no
library module importing the bundle/console layer (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
#: the bundle/console edge: configs' checks, the em-unet command, ignite handlers, datalists
BUNDLE_LAYER = {"pipeline.config", "pipeline.cli", "pipeline.handlers", "pipeline.data"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``, anywhere in its file."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else ".".join(name.split(".")[: -node.level] + [node.module])
                found |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name and m != "pipeline"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert "pipeline.tiling" in graph["pipeline.engine.blocks"]  # the reader sees imports (guards the tests below)
    assert graph["pipeline.tiling"] == {"pipeline.geometry"}


def test_no_import_circle():
    assert _cycle(import_graph()) is None, " -> ".join(_cycle(import_graph()))


def test_a_planted_circle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_library_modules_never_import_the_bundle_layer():
    wrong = {f"{m} -> {t}" for m, targets in import_graph().items() if m not in BUNDLE_LAYER
             for t in targets if t in BUNDLE_LAYER}
    assert not wrong, sorted(wrong)


def test_checks_imports_nothing_of_the_package():
    assert import_graph()["pipeline.checks"] == set()


def test_every_module_loads_through_the_package():
    """Configs write ``pipeline.<module>.<name>`` after ``import pipeline`` (modules load on first use)."""
    import importlib

    import pipeline

    for name in sorted({m.split(".")[1] for m in import_graph() if m.count(".") >= 1}):
        assert getattr(pipeline, name) is importlib.import_module(f"pipeline.{name}"), name
