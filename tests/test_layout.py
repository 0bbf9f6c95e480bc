"""The architecture as an import graph, read with ``ast``: the core imports nothing outside
itself, libraries import only what is below them, no plugin package imports another, no cycles.

Layers (a package may import its own modules and the layers listed for it):

- ``core``: the model, its contracts and the plugin host;
- libraries plugins may use: ``labels`` (the label pipeline), ``engine`` (training loop,
  evaluation, metrics, demo);
- plugin packages: ``experts``, ``adapters``, ``resampler``, ``datasets``, ``simvlm``, ``blip``,
  ``muvla``: each sees the core and the libraries, never another plugin package;
- ``bench``: the benchmark, an application that may use everything.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED: dict[str, set[str]] = {
    "": {"core"},  # the package root (prismkit/__init__.py)
    "core": set(),
    "labels": {"core"},
    "engine": {"core", "labels"},
    "experts": {"core", "labels", "engine"},
    "adapters": {"core", "labels", "engine"},
    "resampler": {"core", "labels", "engine"},
    "datasets": {"core", "labels", "engine"},
    "simvlm": {"core", "labels", "engine"},
    "blip": {"core", "labels", "engine"},
    "muvla": {"core", "labels", "engine"},
    "bench": {"core", "labels", "engine", "experts", "datasets", "blip", "simvlm", "muvla"},
}
# ``from prismkit import hookimpl`` (the root re-exports the core's marker) is fine outside core
for _layer, _deps in ALLOWED.items():
    if _layer not in ("", "core"):
        _deps.add("")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["prismkit", *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "examples", ".venv", "build") or rel.parts[0].startswith("."):
            continue
        out[_module_name(path)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The prismkit module an import names (``from a.b import c`` may name module a.b.c)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the prismkit modules it imports (anywhere in the file, lazy imports included)."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                if n.split(".")[0] != "prismkit":
                    continue
                target = _resolve(n, modules)
                if target and target != mod:
                    graph[mod].add(target)
        graph.setdefault(mod, set())
    return graph


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_every_package_is_placed_in_a_layer():
    packages = {_package(m) for m in import_graph()}
    assert packages <= set(ALLOWED), f"packages without a layer: {packages - set(ALLOWED)}"


def test_packages_import_only_their_layers(capsys):
    graph = import_graph()
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for mod, targets in graph.items():
        for t in targets:
            a, b = _package(mod), _package(t)
            if a != b:
                edges[a, b].append(f"{mod} -> {t}")
    with capsys.disabled():
        print("\nprismkit package import graph (package -> packages it imports):")
        for pkg in sorted(ALLOWED, key=lambda p: (p != "core", p)):
            deps = sorted({b for (a, b) in edges if a == pkg})
            print(f"  {pkg or '(root)':<10} -> {', '.join(d or '(root)' for d in deps) or '-'}")
    bad = [
        line
        for (a, b), lines in sorted(edges.items())
        if b not in ALLOWED.get(a, set())
        for line in lines
    ]
    assert not bad, "imports across the layers:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_graph_reader_sees_lazy_imports():
    """Imports inside functions count: a cycle hidden in a function is still a cycle."""
    graph = import_graph()
    assert "prismkit.core.model" in graph["prismkit.core.api"]
    assert "prismkit.labels.feeder" in graph["prismkit.engine.commands"]
