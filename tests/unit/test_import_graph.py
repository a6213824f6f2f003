"""The package's import graph: the bench is a leaf, and nothing is a cycle.

Read from the source with ast (nothing is imported), every import counts,
also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PACKAGE = "vmthunder"
# The one product module allowed to import the bench: the CLI dispatches
# `vmthunder bench` to the harness.
BENCH_DISPATCH = {("vmthunder.cli", "vmthunder.bench.harness")}


def modules() -> dict[str, str]:
    found = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[mod.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        package = mod if path.endswith("__init__.py") \
            else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split("."))
                                               - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in mods else base)
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_is_read(graph):
    # The checks below are only as good as the graph: it must see the
    # imports we know of.
    assert "vmthunder.nbd.server" in graph["vmthunder.serve"]
    assert "vmthunder.bench.harness" in graph["vmthunder.cli"]


def test_no_product_module_imports_the_bench(graph):
    bad = sorted((mod, dep) for mod, deps in graph.items()
                 if not mod.startswith("vmthunder.bench")
                 for dep in deps if dep.startswith("vmthunder.bench")
                 and (mod, dep) not in BENCH_DISPATCH)
    assert not bad, f"product modules importing the bench: {bad}"


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]]
