"""The package's layout stays walkable: no import cycle between saedynamics modules, and no module
imports another's private (`_`) names. Both read the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

SRC = REPO / "src"


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package (a package is its __init__.py)."""
    found = {}
    for path in sorted((SRC / "saedynamics").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(module, names taken from it, line) of every saedynamics import in module `name`, at any
    depth (inside functions too). `from pkg import sub` counts as importing the module `pkg.sub`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, `level - 1` packages up
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                if f"{module}.{alias.name}" in known:
                    found.append((f"{module}.{alias.name}", [], node.lineno))
                else:
                    found.append((module, [alias.name], node.lineno))
    return [(m, names, line) for m, names, line in found if m.split(".")[0] == "saedynamics"]


def import_graph() -> dict[str, set[str]]:
    """{module: the saedynamics modules it imports}."""
    known = modules()
    return {
        name: {m for m, _, _ in imported(name, path, known) if m in known and m != name}
        for name, path in known.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None when it is acyclic (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert len(graph) > 30 and graph["saedynamics.cli"], "the scan finds the package's imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # the search finds what it looks for
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_private_names_of_another():
    known = modules()
    found = [
        f"{path.relative_to(REPO)}:{line}: from {module} import {', '.join(private)}"
        for name, path in known.items()
        for module, names, line in imported(name, path, known)
        if module != name
        and (private := [n for n in names if n.startswith("_") and not n.endswith("__")])
    ]
    assert found == [], "private names imported across modules:\n" + "\n".join(found)
