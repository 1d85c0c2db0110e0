"""The package's import graph: every module imports, no module imports itself back through
others (no circle), and imports point down the floors of FLOORS (below).

Edges are read from the source (every `import` / `from ... import`, also those inside
functions, and `importlib.import_module("dimba_jax...")` with a literal name), so a late import
that only hides a circle from the interpreter is still a circle here.
"""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dimba_jax"

# Floor of each part of the package: a module may import its own floor or lower ones only.
FLOORS = {
    "dimba_jax.config": 0, "dimba_jax.data": 0, "dimba_jax.ssd": 0,
    "dimba_jax.layers": 1,
    "dimba_jax.interop": 2,
    "dimba_jax.models": 3,
    "dimba_jax.diffusion": 4,
    "dimba_jax.tasks": 5,
    "dimba_jax.train": 6,
    "dimba_jax.evaluate": 7,
    "dimba_jax.api": 8, "dimba_jax.main": 8, "dimba_jax": 9,
}


def _module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _module_names()


def _path(module: str) -> pathlib.Path:
    base = ROOT.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _resolve(name: str) -> str | None:
    """The package module `name` refers to (a module, or the module defining it), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Package modules that `module` imports anywhere in its source."""
    tree = ast.parse(_path(module).read_text())
    is_package = _path(module).name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            targets = [str(node.args[0].value)]
        else:
            continue
        for t in targets:
            if t.startswith("dimba_jax"):
                resolved = _resolve(t)
                if resolved and resolved != module:
                    found.add(resolved)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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


def _floor(module: str) -> int:
    name = module
    while name not in FLOORS:
        name = name.rpartition(".")[0]
    return FLOORS[name]


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_graph_is_read():
    # a few edges the code certainly has: the reader must see them
    assert "dimba_jax.layers.mamba2" in GRAPH["dimba_jax.models.ar"]
    assert "dimba_jax.ssd.pallas_select" in GRAPH["dimba_jax.ssd"]  # via importlib
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    circles = _circles(GRAPH)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_imports_point_down():
    upward = [f"{m} (floor {_floor(m)}) -> {t} (floor {_floor(t)})"
              for m, targets in sorted(GRAPH.items()) for t in sorted(targets)
              if _floor(t) > _floor(m)]
    assert not upward, "upward imports: " + "; ".join(upward)
