"""The shared Numba primitives of ``eff_attn._jit``: the vectorised exp and row maximum.

The oracle is NumPy's float64 ``exp`` and ``max``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from eff_attn._jit import exp_shifted, row_maximum, serial  # noqa: E402

#: Bound on the float32 exp's relative error over [-87, 0] (docs/methods/exact.md, "Performance").
EXP32_REL_ERROR = 3e-7


@serial
def _exp_in_place(row, shift):
    bits = np.empty(row.shape[0], dtype=np.int32)
    return exp_shifted(row, shift, bits)


def test_float32_exp_relative_error_over_a_dense_range():
    x = np.linspace(-87.0, 0.0, 2**22, dtype=np.float32)                    # (4M,) every ~2e-5
    y = x.copy()
    total = _exp_in_place(y, np.float32(0.0))
    exact = np.exp(x.astype(np.float64))
    rel = np.abs(y - exact) / exact
    assert rel.max() < EXP32_REL_ERROR, f"max relative error {rel.max():.3g} at x = {x[rel.argmax()]}"
    assert abs(total - exact.sum()) / exact.sum() < 1e-5


def test_float32_exp_is_exact_at_zero_and_zero_at_minus_inf_and_below_the_range():
    row = np.array([0.0, -np.inf, -100.0, -88.5, 3.0], dtype=np.float32)
    _exp_in_place(row, np.float32(3.0))
    assert row[0] == np.float32(np.exp(-3.0)) or abs(row[0] / np.exp(-3.0) - 1) < EXP32_REL_ERROR
    assert row[1] == 0 and row[2] == 0 and row[3] == 0
    assert row[4] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_propagates_nan(dtype):
    row = np.array([0.0, np.nan, -1.0], dtype=dtype)
    total = _exp_in_place(row, dtype(0.0))
    assert np.isnan(row[1]) and np.isnan(total)
    assert row[0] == 1.0


def test_float64_exp_is_numpy_exp():
    x = np.random.default_rng(0).uniform(-700, 0, 10_000)
    y = x.copy()
    _exp_in_place(y, 0.0)
    np.testing.assert_array_equal(y, np.exp(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 16, 33, 513])
def test_row_maximum_is_numpy_max_nan_and_minus_inf_included(dtype, n):
    rng = np.random.default_rng(n)
    row = rng.standard_normal(n).astype(dtype)
    assert row_maximum(row) == row.max()
    row[rng.integers(n)] = np.nan
    assert np.isnan(row_maximum(row))
    assert row_maximum(np.full(n, -np.inf, dtype=dtype)) == -np.inf
