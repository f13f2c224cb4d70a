"""The packages import one way (core_jax <- clip_jax <- dalle_jax) and without circles.

Only module-level imports count (those inside a function run later, when every module is loaded);
they are read with `ast`, so nothing is imported and the check takes well under a second.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("core_jax", "clip_jax", "dalle_jax")


def _modules() -> dict[str, str]:
    """module name -> file, for every .py file of the three packages."""
    out = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                    out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
    return out


def _top_level(tree: ast.Module):
    """Import statements run when the module loads: the body and its if/try blocks, not defs."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports at load time. `from pkg import name` counts as an
    import of pkg.name when that is a module, else of pkg. The parent packages that `import a.b.c`
    loads on the way are left out: Python starts them first whatever a.b.c needs, and counting
    them would join every package to its own modules."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_pkg = path.endswith("__init__.py")
        for node in _top_level(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import a.b.name` of a non-module name: a.b
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

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
            visit(v)
    return out


def _package_imports(graph, importer: str, imported: str) -> list[str]:
    return sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.split(".")[0] == importer
        for t in ts
        if t.split(".")[0] == imported
    )


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_packages_import_one_way():
    graph = import_graph()
    assert _package_imports(graph, "clip_jax", "dalle_jax") == []
    assert _package_imports(graph, "core_jax", "clip_jax") == []
    assert _package_imports(graph, "core_jax", "dalle_jax") == []


def _reachable(graph, module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_inference_loads_no_training_or_cli_module():
    """Sampling from a workdir needs neither the training task nor a command's flags."""
    loaded = _reachable(import_graph(), "dalle_jax.pipeline")
    assert loaded.isdisjoint(
        {
            "dalle_jax.dalle_task",
            "dalle_jax.attach_decoder",
            "dalle_jax.generate",
            "core_jax.trainer",
            "core_jax.app",
        }
    ), sorted(loaded)


def _imports_anywhere(path: str, package: str) -> bool:
    """Whether the file imports `package` (or a module of it) anywhere, function bodies included."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        if any(n == package or n.startswith(package + ".") for n in names):
            return True
    return False


@pytest.mark.parametrize(
    "package,builder,experiment,model",
    [
        (
            "dalle_jax.experiments",
            "dalle_jax.dvae_models",
            "dalle_jax.experiments.colour_split_dvae",
            "dalle_jax.dvae",
        ),
        (
            "clip_jax.experiments",
            "clip_jax.clip_models",
            "clip_jax.experiments.luma_chroma",
            "clip_jax.model",
        ),
    ],
)
def test_models_reach_experiments_only_through_the_builder(package, builder, experiment, model):
    """An experiments package builds on the models; only the builder above both imports it (at
    load), so no model imports what builds on it."""
    outside = {m: path for m, path in _modules().items() if m != package and not m.startswith(package + ".")}
    graph = import_graph()
    assert sorted(m for m, path in outside.items() if _imports_anywhere(path, package)) == [builder]
    assert experiment in graph[builder]
    assert model in graph[experiment]
    assert builder not in _reachable(graph, model)


def test_the_graph_sees_imports():
    """Guards the tests above against a graph that silently lost its edges."""
    graph = import_graph()
    assert "core_jax.errors" in graph["core_jax.trainer"]  # `from core_jax.errors import ConfigError`
    assert "core_jax.sharding" in graph["core_jax.trainer"]  # `from core_jax import sharding`
    assert "dalle_jax.dalle_task" in _reachable(graph, "dalle_jax.train")
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


if __name__ == "__main__":
    g = import_graph()
    print(f"{len(g)} modules, {sum(map(len, g.values()))} top-level edges")
    for cycle in find_cycles(g):
        print("cycle:", " <-> ".join(cycle))
