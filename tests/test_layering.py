"""The package's layering, as docs/architecture.md writes it down: read every module's imports with ``ast``
(function-level ones included) and fail on an import of a higher layer from a lower one, on any import
cycle, on a module no layer places, and on a layer naming a module that does not exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "timm_cskd"
DOC = ROOT / "docs" / "architecture.md"


def layer_table(text: str) -> dict[str, tuple[int, str]]:
    """Each module name in the doc's layer table: (layer number, layer name)."""
    table = {}
    for line in text.splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|([^|]+)\|", line)
        if row:
            for name in re.findall(r"`([\w.]+)`", row.group(3)):
                table[name] = (int(row.group(1)), row.group(2))
    return table


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return {target for target in found if target in modules and target != name}


def place(module: str, table: dict[str, tuple[int, str]]) -> tuple[int, str] | None:
    """The layer of the longest table name covering ``module``; the package root covers only itself."""
    covering = [n for n in table if module == n or (n != PACKAGE and module.startswith(n + "."))]
    return table[max(covering, key=len)] if covering else None


def upward_imports(graph: dict[str, set[str]], layers: dict[str, tuple[int, str]]) -> list[str]:
    return [
        f"{importer} (layer {layers[importer][0]} {layers[importer][1]}) imports {imported} "
        f"(layer {layers[imported][0]} {layers[imported][1]}), a higher layer"
        for importer, targets in sorted(graph.items())
        for imported in sorted(targets)
        if layers[imported][0] > layers[importer][0]
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(set(group))
            elif target not in index:
                index[target] = low[target] = len(index)
                stack.append(target)
                on_stack.add(target)
                work.append((target, iter(sorted(graph.get(target, ())))))
            elif target in on_stack:
                low[node] = min(low[node], index[target])
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A path from the group's first module back to itself through the group (breadth-first)."""
    start = min(group)
    came_from = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target == start:
                    path = [node]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{sorted(group)} holds no cycle")


@pytest.fixture(scope="module")
def package():
    modules = package_modules(ROOT, PACKAGE)
    table = layer_table(DOC.read_text(encoding="utf-8"))
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    return modules, table, graph


def test_every_module_has_a_layer_and_every_layer_entry_exists(package):
    modules, table, _ = package
    unplaced = [m for m in modules if place(m, table) is None]
    assert not unplaced, (
        f"modules in no layer of {DOC.name} (add each to a row of its layer table): {unplaced}"
    )
    missing = [n for n in table if n not in modules]
    assert not missing, f"{DOC.name} names modules that do not exist: {missing}"


def test_no_module_imports_a_higher_layer(package):
    modules, table, graph = package
    layers = {m: place(m, table) for m in modules}
    violations = upward_imports(graph, layers)
    assert not violations, "\n".join(violations)


def test_no_import_cycle(package):
    _, _, graph = package
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The readers and checks above on a made-up package with one upward import inside a cycle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from pkg.sub import high\n")
    (pkg / "sub" / "__init__.py").write_text("from . import high\n")
    (pkg / "sub" / "high.py").write_text("import pkg.low\n")
    modules = package_modules(tmp_path, "pkg")
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {
        "pkg": set(),
        "pkg.low": {"pkg.sub.high"},
        "pkg.sub": {"pkg.sub.high"},
        "pkg.sub.high": {"pkg.low"},
    }
    table = layer_table("| 0 | base | `pkg`, `pkg.low` | x |\n| 1 | top | `pkg.sub` | y |\n")
    layers = {m: place(m, table) for m in modules}
    assert layers["pkg.sub.high"] == (1, "top") and layers["pkg"] == (0, "base")
    assert upward_imports(graph, layers) == [
        "pkg.low (layer 0 base) imports pkg.sub.high (layer 1 top), a higher layer"
    ]
    assert cycles(graph) == [["pkg.low", "pkg.sub.high", "pkg.low"]]
