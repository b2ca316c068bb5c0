"""The modules of ``cellmap_data`` import each other without a circle.

The graph is read from the source (``ast``), counting every import — at module level and inside
functions alike, since a deferred import still ties the two modules together — plus the package
``__init__`` of every imported submodule (Python runs it first). Layers then read bottom-up:
configuration and the engine, transforms, batches, images and datasets, loaders, writers (the
public API modules), then ``presentation`` (reprs, figures, their formatting), the command
line and ``tools`` (synthetic data, benchmarks, the demo, the loopback server).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cellmap_data"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in modules else source)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        edges: set[str] = set()
        for target in targets:
            # Importing a.b.c runs the __init__ of a.b first (the root package's is lazy).
            parts = target.split(".")
            for k in range(2, len(parts) + 1):
                candidate = ".".join(parts[:k])
                if candidate in modules:
                    edges.add(candidate)
        edges.discard(name)
        # A package importing its own submodules is how packages are built, not a circle.
        graph[name] = {e for e in edges if not (path.name == "__init__.py" and e.startswith(name + "."))}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read_from_every_module():
    graph = import_graph()
    assert "cellmap_data.loader" in graph and "cellmap_data.batches" in graph["cellmap_data.loader"]
    assert "cellmap_data.transforms.augment._common" in graph["cellmap_data.batches"]


def test_the_package_modules_import_each_other_without_a_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def _importers_of(graph: dict[str, set[str]], package: str) -> set[str]:
    """Modules outside ``package`` that import it or one of its modules."""
    return {m for m, edges in graph.items() if not (m == package or m.startswith(package + "."))
            and any(e == package or e.startswith(package + ".") for e in edges)}


def test_only_the_command_line_imports_the_tools():
    """The library (its reprs and figures included) never needs the benchmarks, the demo or
    synthetic data; ``python -m cellmap_data bench|demo|synth`` reaches them through the CLI."""
    assert _importers_of(import_graph(), "cellmap_data.tools") <= {"cellmap_data.cli"}


def test_presentation_imports_none_of_the_classes_it_shows():
    """Reprs and figures read objects through their public attributes, so the classes can import
    them (for ``__repr__``) without a circle."""
    api = {"cellmap_data.dataset", "cellmap_data.multidataset", "cellmap_data.datasplit", "cellmap_data.loader",
           "cellmap_data.image", "cellmap_data.writer"}
    graph = import_graph()
    for module in (m for m in graph if m.startswith("cellmap_data.presentation.")):
        assert not graph[module] & api, f"{module} imports {sorted(graph[module] & api)}"


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
