"""The package's import graph, read from the source with ast: no module takes part in a cycle.

Every `import` counts, at module level or inside a function (a lazy import hides a cycle from
Python, not from the design), except those under `if TYPE_CHECKING:`, which never run. An
import of `pkg.mod` adds an edge to the module `pkg.mod`; `from pkg import name` to `pkg.name`
when that is a module, else to `pkg`. Package `__init__` modules that re-export their
submodules are ordinary nodes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dynaroute

ROOT = Path(dynaroute.__file__).resolve().parent
# The training modules are being restructured separately; the check covers the rest of the package.
EXCLUDED = ("dynaroute.train",)


def module_names(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The dynaroute modules that module `name` (file `path`) imports."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != name}


def import_graph(excluded: tuple[str, ...] = EXCLUDED) -> dict[str, set[str]]:
    modules = module_names()

    def kept(m: str) -> bool:
        return not any(m == e or m.startswith(e + ".") for e in excluded)

    return {m: {d for d in imports_of(m, p, modules) if kept(d)} for m, p in modules.items() if kept(m)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    modules = module_names(pkg)
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    assert graph["pkg.c"] == set()  # type-only imports never run
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_cycles_in_the_package() -> None:
    graph = import_graph()
    assert "dynaroute.registry" in graph and graph["dynaroute.registry"] <= {"dynaroute.errors"}
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
