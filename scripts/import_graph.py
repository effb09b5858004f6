"""Measure the import structure of eff_attn.

Reads every module of the package with :mod:`ast` (nothing is imported) and
prints:

- the cycles of the module import graph, counting the imports that run when a
  module is imported (module level, class bodies, ``try``/``if`` blocks) and,
  separately, also the deferred imports inside functions;
- every import from one method into another (``eff_attn.methods.X`` importing
  ``eff_attn.methods.Y``, ``Y != X``);
- every backend module (``reference.py``, ``numba.py``, ``cupy.py``) that
  calls back into ``eff_attn.api``, the top package or its own method's
  ``__init__``;
- every ``reference.py`` that imports a backend (a ``numba.py``/``cupy.py``
  module, or the numba or cupy packages);
- every core module (below the methods: registry, api, validation, masks, ...)
  that imports a method;
- every import of a private name (``_x``) of ``eff_attn.api``: backend choice
  and parameter resolution are ``eff_attn._dispatch``'s, not api internals;
- the lines of each method's ``__init__.py``;
- the wall time of ``import eff_attn`` in a fresh interpreter (median of
  ``--runs`` runs) and which modules that import loads.

Run from the repository root::

    python scripts/import_graph.py            # all figures
    python scripts/import_graph.py --no-time  # the static figures only

``tests/test_architecture.py`` loads this file to check the import rules of
``docs/architecture.md``.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "eff_attn"
METHODS = "eff_attn.methods"
BACKEND_FILES = ("reference", "numba", "cupy")
HEAVY = ("numba", "cupy", "torch", "jax")

#: Modules above the methods: they may import a method. Every other module
#: outside ``eff_attn.methods`` is a core module, which must not.
FRONTENDS = ("eff_attn", "eff_attn.bench", "eff_attn.cli", "eff_attn.dist", "eff_attn.torch", "eff_attn.jax")

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Import:
    """One imported module, as resolved from one import statement."""

    source: str     # the importing module
    target: str     # the imported module (a package's __init__ for ``from pkg import name``)
    line: int
    deferred: bool  # inside a function: runs when the function is called, not at import


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    files = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, deferred: bool = False):
    """Yield ``(import node, deferred)``; skips ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, deferred
        elif isinstance(child, ast.If) and _type_checking(child):
            continue
        else:
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _walk(child, inner)


def imports_of(name: str, files: dict[str, Path]) -> list[Import]:
    """Every module that ``name`` imports (package modules and outside ones)."""
    tree = ast.parse(files[name].read_text(encoding="utf-8"), filename=str(files[name]))
    package = name if _is_package(name, files) else name.rpartition(".")[0]
    found = []
    for node, deferred in _walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
        for target in dict.fromkeys(targets):
            found.append(Import(name, target, node.lineno, deferred))
    return found


def import_graph(root: Path = ROOT) -> tuple[dict[str, Path], list[Import]]:
    """The package's modules and all their imports."""
    files = module_files(root)
    return files, [imp for name in files for imp in imports_of(name, files)]


def cycles(edges: list[Import], files: dict[str, Path], *, deferred: bool = False) -> list[list[str]]:
    """Strongly connected groups (more than one module, or a self-import) of the package graph.

    ``deferred=False`` keeps only the imports that run at import time.
    """
    graph: dict[str, set[str]] = {name: set() for name in files}
    for e in edges:
        if e.target in files and (deferred or not e.deferred):
            graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(v):                                                           # Tarjan's algorithm
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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(groups)


def method_of(module: str) -> str | None:
    """``"yoso"`` for ``eff_attn.methods.yoso.numba``; None outside a method."""
    parts = module.split(".")
    return parts[2] if module.startswith(METHODS + ".") else None


def _pairs(edges) -> list[str]:
    return sorted({f"{e.source} -> {e.target}" for e in edges})


def method_to_method(edges: list[Import]) -> list[str]:
    """``"source -> target"`` for every import of one method by another."""
    return _pairs(e for e in edges
                  if method_of(e.source) and method_of(e.target) not in (None, method_of(e.source)))


def backend_callbacks(edges: list[Import]) -> list[str]:
    """Backend modules importing ``eff_attn.api``, ``eff_attn`` or their own method package."""
    return _pairs(e for e in edges
                  if method_of(e.source) and e.source.rpartition(".")[2] in BACKEND_FILES
                  and e.target in ("eff_attn.api", PACKAGE, f"{METHODS}.{method_of(e.source)}"))


def reference_imports_backend(edges: list[Import]) -> list[str]:
    """``reference.py`` modules importing a ``numba.py``/``cupy.py`` module or numba/cupy."""
    return _pairs(e for e in edges
                  if method_of(e.source) and e.source.endswith(".reference")
                  and (e.target.split(".")[0] in ("numba", "cupy")
                       or (method_of(e.target) and e.target.rpartition(".")[2] in ("numba", "cupy"))))


def core_imports_method(edges: list[Import]) -> list[str]:
    """Core modules (neither a method nor a frontend) importing a method."""
    def frontend(m):
        return m == PACKAGE or any(m == f or m.startswith(f + ".") for f in FRONTENDS if f != PACKAGE)
    return _pairs(e for e in edges
                  if e.source.startswith(PACKAGE) and not method_of(e.source) and e.source != METHODS
                  and not frontend(e.source) and method_of(e.target))


def private_api_imports(files: dict[str, Path]) -> list[str]:
    """``"module -> eff_attn.api._name"`` for every ``from ... api import _name`` outside the api."""
    found = set()
    for name, path in files.items():
        if name == f"{PACKAGE}.api":
            continue
        package = name if _is_package(name, files) else name.rpartition(".")[0]
        for node, _ in _walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base == f"{PACKAGE}.api":
                found.update(f"{name} -> {base}.{a.name}" for a in node.names if a.name.startswith("_"))
    return sorted(found)


def init_lines(files: dict[str, Path]) -> dict[str, int]:
    """Method name -> lines of its ``__init__.py``."""
    return {method_of(name): len(path.read_text(encoding="utf-8").splitlines())
            for name, path in files.items() if method_of(name) and name.count(".") == 2}


_PROBE = """
import json, sys, time
t = time.perf_counter()
import eff_attn
t = time.perf_counter() - t
print(json.dumps({"seconds": t, "modules": sorted(sys.modules)}))
"""


def import_time(root: Path = ROOT, runs: int = 5) -> dict:
    """``import eff_attn`` in ``runs`` fresh interpreters: median seconds and what it loaded."""
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    results = [json.loads(subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=root, check=True,
                                         capture_output=True, text=True).stdout) for _ in range(runs)]
    modules = results[-1]["modules"]
    return {
        "median_s": statistics.median(r["seconds"] for r in results),
        "runs_s": [r["seconds"] for r in results],
        "package_modules": [m for m in modules if m == PACKAGE or m.startswith(PACKAGE + ".")],
        "method_modules": [m for m in modules if m.startswith(METHODS + ".")],
        "heavy": [m for m in HEAVY if m in modules],
    }


def _section(title, rows):
    print(f"\n## {title}: {len(rows)}")
    for row in rows:
        print(f"  {row}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters timing `import eff_attn`")
    parser.add_argument("--no-time", action="store_true", help="skip the import timing")
    args = parser.parse_args(argv)
    files, edges = import_graph(args.root)
    print(f"# eff_attn import graph: {len(files)} modules, {len(edges)} imports")
    _section("import-time cycles", [" <-> ".join(c) for c in cycles(edges, files)])
    _section("cycles counting deferred (in-function) imports",
             [" <-> ".join(c) for c in cycles(edges, files, deferred=True)])
    _section("method -> other-method imports", method_to_method(edges))
    _section("backend -> api / own package imports", backend_callbacks(edges))
    _section("reference -> backend imports", reference_imports_backend(edges))
    _section("core -> method imports", core_imports_method(edges))
    _section("imports of private api names", private_api_imports(files))
    lines = init_lines(files)
    print(f"\n## lines per method __init__.py: total {sum(lines.values())}")
    for name, n in sorted(lines.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<14}{n:>5}")
    if not args.no_time:
        t = import_time(args.root, args.runs)
        print(f"\n## import eff_attn (fresh interpreter, median of {args.runs})")
        print(f"  median {t['median_s'] * 1e3:.0f} ms; runs "
              + ", ".join(f"{s * 1e3:.0f}" for s in t["runs_s"]) + " ms")
        print(f"  eff_attn modules loaded: {len(t['package_modules'])}, "
              f"of them eff_attn.methods.*: {len(t['method_modules'])}")
        print(f"  heavy packages loaded: {', '.join(t['heavy']) or 'none'}")


if __name__ == "__main__":
    main()
