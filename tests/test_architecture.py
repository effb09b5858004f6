"""The layering of docs/architecture.md: lazy package import and the import rules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import eff_attn


def test_import_loads_no_method_and_no_backend_package():
    code = (
        "import json, sys, eff_attn; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('eff_attn.methods.') "
        "or m.split('.')[0] in ('numba', 'cupy', 'torch', 'jax'))))"
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


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_attention'"):
        eff_attn.no_such_attention
