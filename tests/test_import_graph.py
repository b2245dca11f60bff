"""normexport's modules import each other without a circle: every import counts (module level,
inside functions, under TYPE_CHECKING), and so do the modules a registry or a package names
as strings to import on first use. A module's own ancestor packages are imported before it in
any case, so a name taken from one (``from normexport import __version__``) is no edge."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "normexport"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value and node.value in mods:
                names = [node.value]  # a registry's reference: Ref("normexport.fuse.targets", ...)
            elif isinstance(node, ast.Dict) and path.name == "__init__.py":  # a package's lazy names: {name: submodule}
                names = [f"{mod}.{v.value}" for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str) and f"{mod}.{v.value}" in mods]
            for name in names:
                target = resolve(name)
                if target is not None and target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_graph_sees_every_kind_of_import():
    """The check reads function-level imports and registry references: a circle through
    either would be reported."""
    graph = import_graph()
    assert "normexport.fuse.targets" in graph["normexport.fuse.registry"]  # Ref(...) string
    assert "normexport.fuse.fusion" in graph["normexport.fuse"]  # the package's lazy names
    assert "normexport.pipeline" in graph["normexport.cli"]  # inside a command
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
