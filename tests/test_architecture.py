"""The shape of the house: the import graph of ``lineas_fast/`` has no circles, and the core never imports
the packages that plug into it (:mod:`lineas_fast.diffusion` registers a model view; the CLI is a
front-end). Imports are read from the source (module level and inside functions), not executed."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "lineas_fast"
PLUGINS = ("lineas_fast.diffusion",)  # plug into the core through lineas_fast.views
FRONT_ENDS = ("lineas_fast.cli", "lineas_fast.demo")  # may import anything


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(importer: str, is_pkg: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    """``{module: {lineas_fast modules it imports}}`` (a ``from pkg import name`` names the submodule
    ``pkg.name`` when that is a module, else ``pkg``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_pkg, node.level, node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # lineas_fast.x.y where y is an attribute of module x
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("lineas_fast"):
                    graph[name].add(t)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_import_graph_has_no_circles():
    assert circles(import_graph()) == []


def test_the_core_never_imports_a_plugin():
    graph = import_graph()
    bad = sorted((m, t) for m, targets in graph.items() for t in targets
                 if not _under(m, PLUGINS + FRONT_ENDS) and m != "lineas_fast" and _under(t, PLUGINS))
    assert bad == [], f"core modules importing a plugin package: {bad}"


def test_the_checks_can_fail():
    """The two checks above see what they claim to: a made-up circle and a made-up core→plugin arrow."""
    graph = {"lineas_fast.a": {"lineas_fast.b"}, "lineas_fast.b": {"lineas_fast.c"}, "lineas_fast.c": {"lineas_fast.a"},
             "lineas_fast.d": set()}
    assert circles(graph) == [["lineas_fast.a", "lineas_fast.b", "lineas_fast.c"]]
    real = import_graph()
    assert "lineas_fast.views" in real["lineas_fast.diffusion"]  # the plugin registers itself with the core
    assert "lineas_fast.forward" in real["lineas_fast.collect"]
