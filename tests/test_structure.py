"""The import graph of regraft: data flows one way (Source/Target -> match -> Plan -> apply -> Report).

Every ``import`` of a regraft module inside ``src/regraft`` counts, at module level or inside a
function: a lazy import is still a dependency. The graph must have no cycle, and the layers
below must only import downwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "regraft"

# Lower layers first; a module may import modules of its own layer or of layers above it in this list.
LAYERS = [
    {"errors"},
    {"entries", "naming", "names", "files", "keys", "layouts", "writing"},
    {"sources", "targets"},
    {"rules", "transforms", "plans"},
    {"report", "growth", "align", "optimizer_state"},
    {"matching", "planfile"},
    {"applying", "verification"},
    {"api", "demo", "building"},
    {"cli", "__init__", "__main__"},
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The regraft modules ``path`` imports: ``from regraft.x import y`` is ``x.y`` when that is a module, else ``x``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "regraft":
            base = node.module[len("regraft."):] if node.module != "regraft" else ""
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in modules else base or "__init__")
        elif isinstance(node, ast.Import):
            found.update(a.name[len("regraft."):] for a in node.names if a.name.startswith("regraft."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    modules = {m.removesuffix(".__init__") if m != "__init__" else m: p for m, p in modules.items()}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imports(path, set(modules)):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                deps.add(imported)
        graph[name] = deps
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_modules_only_import_downwards():
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    graph = _graph()
    unknown = sorted({_top(m) for m in graph} - set(rank))
    assert not unknown, f"modules missing from LAYERS in this test: {unknown}"
    upward = [
        f"{module} -> {dep}"
        for module, deps in graph.items()
        for dep in deps
        if _top(dep) != _top(module) and rank[_top(dep)] > rank[_top(module)]
    ]
    assert not upward, "imports that go up the layers: " + ", ".join(sorted(upward))


def test_plan_is_data_only():
    assert _graph()["plans"] <= {"entries", "errors", "naming", "rules"}
    assert _graph()["report"] <= {"plans", "naming", "entries", "errors"}
