"""The self-contained examples run (small sizes) and do what they say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import eff_attn
from eff_attn import registry
from eff_attn.testing import assert_close

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"eff_attn_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                                         # Numba's cache looks the module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def custom():
    module = load("custom_method")
    yield module
    if module.NAME in registry.method_names():
        registry.unregister(module.NAME)


def test_custom_method_template_matches_its_definition(custom):
    custom.register()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, 5)) for _ in range(3))
    mask = np.array([[1, 1, 0, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1]], dtype=bool)
    for backend in ("numpy", "numba") if eff_attn.backends()["numba"]["available"] else ("numpy",):
        out = eff_attn.attention(q, k, v, method=custom.NAME, backend=backend, mask=mask, causal=True, bias=0.5)
        expected = np.zeros((2, 7, 5))
        for g in range(2):                                                  # o_i = sum_{j<=i, kept} sigma(s_ij + b) v_j
            for i in range(7):
                for j in range(i + 1):
                    if mask[g, j]:
                        expected[g, i] += v[g, j] / (1 + np.exp(-(q[g, i] @ k[g, j] / np.sqrt(5) + 0.5)))
        assert_close(out, expected, rel=1e-12)


def test_custom_method_template_main_runs(custom, capsys):
    backend = "numba" if eff_attn.backends()["numba"]["available"] else "numpy"
    custom.main(["--backend", backend, "--n", "64"])
    text = capsys.readouterr().out
    assert "agrees with the NumPy reference" in text and "finite differences" in text
    assert f"| {custom.NAME} |" in text


def test_long_sequence_example_runs(capsys):
    load("long_sequence").main(["--backend", "numpy", "--n", "256", "--heads", "2",
                                "--methods", "exact,local,performer"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.strip()}
    assert set(rows) == {"exact", "local", "performer"}
    assert float(rows["exact"][-1]) < 1e-6                                  # exact against itself
