"""The layering of docs/architecture.md: lazy package import and the import rules."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import eff_attn


def test_import_loads_no_method_and_no_heavy_package():
    code = (
        "import json, sys, eff_attn; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('eff_attn.methods.') "
        "or m.split('.')[0] in ('numba', 'cupy', 'torch', 'jax', 'scipy', 'matplotlib'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


def test_every_public_name_resolves_on_first_access():
    code = (
        "import json, eff_attn; "
        "print(json.dumps({n: callable(getattr(eff_attn, n)) for n in eff_attn.__all__}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    resolved = json.loads(result.stdout)
    assert resolved == {name: True for name in eff_attn.__all__}
    assert "yoso_attention" in resolved and "attention" in resolved and "NotSupportedError" in resolved


def test_public_names_are_the_defining_modules_objects_and_listed_by_dir():
    from eff_attn.methods.yoso import yoso_attention
    from eff_attn.registry import NotSupportedError

    assert eff_attn.yoso_attention is yoso_attention
    assert eff_attn.NotSupportedError is NotSupportedError
    assert set(eff_attn.__all__) <= set(dir(eff_attn))
    assert eff_attn.registry is sys.modules["eff_attn.registry"]               # submodules still resolve


def test_the_static_imports_for_type_checkers_match_the_lazy_table():
    tree = ast.parse(Path(eff_attn.__file__).read_text(encoding="utf-8"))
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    static = {alias.name: f"eff_attn.{node.module}" for node in block.body for alias in node.names}
    assert static == eff_attn._PUBLIC
    assert sorted(eff_attn.__all__) == sorted(eff_attn._PUBLIC)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_attention'"):
        eff_attn.no_such_attention


# --- import rules (static, read with ast by scripts/import_graph.py) -----------------------

def _load_import_graph():
    path = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("eff_attn_import_graph", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                                         # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


graph = _load_import_graph()
FILES, EDGES = graph.import_graph()


def test_the_graph_reads_every_module_and_resolves_relative_imports():
    assert {"eff_attn", "eff_attn.api", "eff_attn.registry", "eff_attn.methods.yoso.reference"} <= set(FILES)
    api = {e.target for e in EDGES if e.source == "eff_attn.api"}
    assert {"eff_attn.registry", "eff_attn._validate", "eff_attn._dispatch", "eff_attn.masks"} <= api
    yoso_numba = {e.target for e in EDGES if e.source == "eff_attn.methods.yoso.numba"}
    assert "numba" in yoso_numba and "eff_attn._jit" in yoso_numba


def test_no_import_cycle_at_import_time():
    assert graph.cycles(EDGES, FILES) == []


def test_no_reference_imports_a_backend():
    assert graph.reference_imports_backend(EDGES) == []


def test_no_core_module_imports_a_method():
    assert graph.core_imports_method(EDGES) == []


def test_no_method_imports_another_method():
    assert graph.method_to_method(EDGES) == []


def test_no_module_imports_a_private_api_name():
    assert graph.private_api_imports(FILES) == []


def test_no_backend_imports_the_api_or_its_own_package():
    assert graph.backend_callbacks(EDGES) == []


def test_no_import_cycle_even_through_imports_inside_functions():
    assert graph.cycles(EDGES, FILES, deferred=True) == []


def test_the_rules_catch_a_violation(tmp_path):
    package = tmp_path / "eff_attn"
    for name, text in {
        "__init__.py": "",
        "api.py": "from . import registry\n",
        "registry.py": "from .methods.a import reference\n",                 # core -> method
        "methods/__init__.py": "",
        "methods/a/__init__.py": "def wrapper():\n    from ...api import attention\n",
        "methods/a/reference.py": "from . import numba, wrapper\nfrom .. import b\n",  # -> backend, package, b
        "methods/a/numba.py": "from eff_attn.api import prepare\n",            # backend -> api
        "methods/b/__init__.py": "from eff_attn import api\n",
        "methods/b/helpers.py": "from ...api import _select_impl, prepare\n",      # a private api name
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    files, edges = graph.import_graph(tmp_path)
    assert graph.cycles(edges, files) == [["eff_attn.api", "eff_attn.methods.a.numba", "eff_attn.methods.a.reference",
                                           "eff_attn.methods.b", "eff_attn.registry"]]
    assert graph.reference_imports_backend(edges) == ["eff_attn.methods.a.reference -> eff_attn.methods.a.numba"]
    assert graph.core_imports_method(edges) == ["eff_attn.registry -> eff_attn.methods.a.reference"]
    assert graph.method_to_method(edges) == ["eff_attn.methods.a.reference -> eff_attn.methods.b"]
    assert graph.private_api_imports(files) == ["eff_attn.methods.b.helpers -> eff_attn.api._select_impl"]
    assert graph.backend_callbacks(edges) == ["eff_attn.methods.a.numba -> eff_attn.api",
                                              "eff_attn.methods.a.reference -> eff_attn.methods.a"]
    assert graph.cycles(edges, files, deferred=True) == [                # a -> api only inside a function
        ["eff_attn.api", "eff_attn.methods.a", "eff_attn.methods.a.numba", "eff_attn.methods.a.reference",
         "eff_attn.methods.b", "eff_attn.registry"]]


# --- public wrappers: thin, with the api's common arguments and resolve's parameters -------

#: Wrapper defaults that differ from the api's on purpose: Reformer's shared-QK form
#: ``reformer_attention(q, v=v, shared_qk=True)`` takes no k.
WRAPPER_DEFAULTS = {"reformer": {"k": None, "v": None}}


def _builtin_methods():
    from eff_attn.registry import METHOD_MODULES

    return sorted(METHOD_MODULES)


@pytest.mark.parametrize("name", _builtin_methods())
def test_public_wrapper_signature_is_the_common_arguments_plus_resolves_keywords(name):
    import inspect

    from eff_attn.api import attention
    from eff_attn.registry import METHOD_MODULES, get_method

    method = get_method(name)
    wrapper = getattr(importlib.import_module(METHOD_MODULES[name].partition(":")[0]), f"{name}_attention")
    api_params = inspect.signature(attention).parameters
    common = [api_params[n] for n in ("q", "k", "v", "backend", "mask", "causal", "scale", "rng", "return_info")]
    common = [p.replace(default=WRAPPER_DEFAULTS[name][p.name]) if p.name in WRAPPER_DEFAULTS.get(name, {}) else p
              for p in common]
    own = [p for p in inspect.signature(method.resolve).parameters.values() if p.kind is p.KEYWORD_ONLY]

    def described(params):
        return [(p.name, p.kind, p.default) for p in params]

    assert described(inspect.signature(wrapper).parameters.values()) == described(common + own)
