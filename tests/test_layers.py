"""The package's layers, checked: imports run one way only and no module imports itself back.

Every ``import``/``from`` statement of every dbquant module is read statically (function-local
ones too: a local import must not hide a cycle), resolved to the dbquant module it names, and
checked against :data:`LAYERS`. Then a fresh interpreter imports every module in dependency
order, so a module that only works when something else was imported first also fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> package name (calibration/ and kernels/ are installed under dbquant).
SOURCES = {ROOT / "dbquant": "dbquant", ROOT / "calibration": "dbquant.calibration",
           ROOT / "kernels": "dbquant.kernels"}

# Layer -> rank. A module may import from its own layer and from layers of a lower rank;
# layers of equal rank (quant, backends) may not import each other.
LAYERS = {
    "dbquant._version": 0, "dbquant.errors": 0, "dbquant.faults": 0, "dbquant.kernels": 0, "dbquant._C": 0,
    "dbquant._C_cuda": 0,
    "dbquant.format": 1,
    "dbquant.quant": 2, "dbquant.backends": 2,
    "dbquant.model": 3,
    "dbquant.runtime": 4,
    "dbquant.eval": 5,
    "dbquant.calibration": 6,
    "dbquant.quantize": 7, "dbquant.bench": 7,
    "dbquant.cli": 8, "dbquant.__main__": 9,
    "dbquant": 9,  # the package root: the public facade (load, save), imported by nobody inside
}


def layer_of(module: str) -> str:
    """The longest LAYERS key that is ``module`` or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return name
    raise AssertionError(f"module {module} is in no layer; add it to LAYERS in {__file__}")


def all_modules() -> dict[str, Path]:
    """dbquant module name -> source file, for every .py of the package folders."""
    out = {}
    for folder, pkg in SOURCES.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """The dbquant modules ``module`` imports (anywhere in the file), with line numbers."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            found += [(n, node.lineno) for n in names if n == "dbquant" or n.startswith("dbquant.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                pkg = node.module or ""
            if not (pkg == "dbquant" or pkg.startswith("dbquant.")):
                continue
            for a in node.names:  # `from pkg import submodule` names the submodule
                sub = f"{pkg}.{a.name}"
                found.append((sub if sub in known or a.name in ("_C", "_C_cuda") else pkg, node.lineno))
    return [(t, ln) for t, ln in found if t != module]


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    mods = all_modules()
    return mods, {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_every_import_points_down_the_layers():
    mods, edges = graph()
    bad = []
    for m, targets in edges.items():
        lm = layer_of(m)
        for t, line in targets:
            lt = layer_of(t)
            if lt != lm and LAYERS[lt] >= LAYERS[lm]:
                bad.append(f"{mods[m].relative_to(ROOT)}:{line}: {m} ({lm}, rank {LAYERS[lm]}) imports "
                           f"{t} ({lt}, rank {LAYERS[lt]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def _cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def module_edges() -> dict[str, list[str]]:
    mods, edges = graph()
    # the package root is imported implicitly by every submodule; its own imports are the facade
    return {m: sorted({t for t, _ in ts if t in mods and t != "dbquant"}) for m, ts in edges.items()
            if m != "dbquant"}


def test_no_import_cycles():
    cycles = _cycles(module_edges())
    assert not cycles, "import cycles (function-local imports included):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_finds_a_cycle_and_a_wrong_way_import():
    # The checks above must be able to fail: a planted cycle and an upward edge are reported.
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert LAYERS[layer_of("dbquant.model.plan")] > LAYERS[layer_of("dbquant.format.layout")]
    assert layer_of("dbquant.runtime.kv.cache") == "dbquant.runtime"


def topological_order() -> list[str]:
    edges = module_edges()
    order, seen = [], set()

    def visit(m):
        if m in seen:
            return
        seen.add(m)
        for t in edges.get(m, ()):
            visit(t)
        order.append(m)

    for m in sorted(edges):
        visit(m)
    return order


OPTIONAL = {"dbquant.kernels.dbgemm_triton", "dbquant.kernels.kv_dequant_triton"}  # need triton


def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter():
    order = [m for m in topological_order() if m not in OPTIONAL and m != "dbquant.__main__"]
    assert len(order) > 40
    code = ("import importlib, sys\n"
            f"for m in {order!r}:\n"
            "    importlib.import_module(m)\n"
            "print('imported', len(sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.parametrize("module", ["dbquant.format.layout", "dbquant.backends.reference", "dbquant.cli"])
def test_a_module_imports_alone(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in sorted((ROOT / "dbquant").glob("*/__init__.py")) + [ROOT / "calibration" / "__init__.py"]:
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init.relative_to(ROOT)} lacks a docstring saying what it may import"
