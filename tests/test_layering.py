"""The package's layers, checked from the source: no import from a lower layer to a higher one,
and no import cycle between modules.

Layers, lowest first (a module may import from its own layer and the ones below):

    0  reference, kernels_cpu, kernels_triton          the Bi-WKV4 operator
    1  hpcm_triton.{entropy, layers, rwkv, defaults, outputs, progress, images}
                                                       building blocks and utilities
    2  hpcm_triton.models                              the codec and its variants
    3  hpcm_triton.{bitstream, coding_env}             the .hpcm container
    4  hpcm_triton.{training, evaluate, study}         the applications
    5  hpcm_triton.{cli, __main__}                     the command line

Every ``import`` statement counts, also those inside functions (a lazy import is still a
dependency). ``hpcm_triton/__init__.py`` is the package's facade: it names its lazy exports
as strings and imports nothing of the package statically.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reference", "kernels_cpu", "kernels_triton", "hpcm_triton")
LAYERS = [
    ("reference", "kernels_cpu", "kernels_triton"),
    ("hpcm_triton.entropy", "hpcm_triton.layers", "hpcm_triton.rwkv", "hpcm_triton.defaults", "hpcm_triton.outputs",
     "hpcm_triton.progress", "hpcm_triton.images"),
    ("hpcm_triton.models",),
    ("hpcm_triton.bitstream", "hpcm_triton.coding_env"),
    ("hpcm_triton.training", "hpcm_triton.evaluate", "hpcm_triton.study"),
    ("hpcm_triton.cli", "hpcm_triton.__main__"),
]
FACADE = "hpcm_triton"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _resolve(name: str, modules: dict) -> str | None:
    """The project module ``name`` refers to (itself, or its nearest enclosing package)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(mod: str, path: Path, modules: dict) -> set[str]:
    """Project modules imported anywhere in ``path`` (module level or inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from pkg import sub" may import the submodule pkg.sub
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for n in names:
            target = _resolve(n, modules)
            if target is not None and target != mod:
                found.add(target)
    return found


def _layer(mod: str) -> int | None:
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if mod == prefix or mod.startswith(prefix + "."):
                best = i
    return best


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer(graph):
    missing = sorted(m for m in graph if m != FACADE and _layer(m) is None)
    assert not missing, f"modules outside every layer (add them to LAYERS): {missing}"


def test_the_facade_imports_nothing_of_the_package_statically(graph):
    assert graph[FACADE] == set(), graph[FACADE]


def test_no_import_runs_up_a_layer(graph):
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, targets in graph.items() if m != FACADE for t in sorted(targets)
           if t != FACADE and None not in (_layer(t), _layer(m)) and _layer(t) > _layer(m)]
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def _cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
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


def test_no_import_cycles(graph):
    cycles = _cycles({m: {t for t in ts if t != FACADE} for m, ts in graph.items()})
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_catch_what_they_are_for():
    """The analysis itself: an upward import and a cycle are found in a made-up graph."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("hpcm_triton.models.hpcm") == 2 and _layer("hpcm_triton.training.loop") == 4
    modules = _modules()
    src = ROOT / "hpcm_triton" / "models" / "zoo.py"
    assert "hpcm_triton.models.hpcm" in _imports("hpcm_triton.models.zoo", src, modules)
    assert "hpcm_triton.models.weights" in _imports("hpcm_triton.models.zoo", src, modules)
