"""The layout's rules: no import circle, imports point one way, package roots keep only their face.

The import graph is read from the source (every ``import`` statement, also those inside functions
and under ``TYPE_CHECKING``), so a circle hidden behind a lazy import is still a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "edge_agent", "aggregator")
FACE = {"__init__.py", "__main__.py", "cli.py", "errors.py"}


def package_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def bench_modules() -> dict[str, Path]:
    """The benchmark scripts import each other by file name (their folder is on sys.path)."""
    return {p.stem: p for p in sorted((ROOT / "benchmarks").glob("*.py"))}


def imported(path: Path) -> Iterator[tuple[str, str | None]]:
    """(module, name) for each ``import module`` and ``from module import name`` in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                yield node.module, alias.name


def graph(modules: dict[str, Path], known: set[str]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for module, item in imported(path):
            if item is not None and f"{module}.{item}" in known:
                targets.add(f"{module}.{item}")
            elif module in known:
                targets.add(module)
        edges[name] = targets - {name}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
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
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_circles_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_packages() -> None:
    modules = package_modules()
    assert circles(graph(modules, set(modules))) == []


def test_no_import_circle_in_the_benchmarks() -> None:
    modules = bench_modules()
    assert circles(graph(modules, set(modules))) == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("edge_agent", ("aggregator",)), ("protocol", ("aggregator", "edge_agent"))],
)
def test_imports_point_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    wrong = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for module, _ in imported(path)
        if module.split(".")[0] in forbidden
    ]
    assert wrong == []


def test_an_edge_server_loads_no_aggregator_code() -> None:
    """Importing every module of edge_agent (the client methods too) loads no aggregator module."""
    names = [n for n in package_modules() if n.startswith("edge_agent") and "__main__" not in n]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aggregator'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("package", ["aggregator", "edge_agent"])
def test_package_root_holds_only_its_face(package: str) -> None:
    at_root = {p.name for p in (ROOT / package).glob("*.py")}
    assert at_root <= FACE, sorted(at_root - FACE)


def test_every_package_says_what_it_owns() -> None:
    for package in PACKAGES:
        for init in sorted((ROOT / package).rglob("__init__.py")):
            doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
            assert doc, f"{init.relative_to(ROOT)} has no docstring"
