"""Error measures of eff_attn.metrics against independent oracles (LAPACK's SVD, hand examples)."""

from __future__ import annotations

import numpy as np
import pytest

from eff_attn import metrics


@pytest.mark.parametrize("shape", [(3, 200, 7), (2, 5, 40), (4, 9, 9), (2, 3, 1, 6), (1, 1)])
def test_spectral_norm_is_the_largest_singular_value(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * rng.uniform(0.1, 10.0)
    expected = np.linalg.svd(x, compute_uv=False)[..., 0]                   # LAPACK's SVD, the oracle
    np.testing.assert_allclose(metrics.spectral_norm(x), expected, rtol=1e-12, atol=0)


def test_spectral_norm_hand_examples():
    assert metrics.spectral_norm(np.diag([3.0, -5.0, 1.0])) == pytest.approx(5.0, rel=1e-15)
    assert metrics.spectral_norm(np.ones((4, 9))) == pytest.approx(6.0, rel=1e-14)          # rank one: sqrt(4 * 9)
    np.testing.assert_array_equal(metrics.spectral_norm(np.zeros((2, 6, 3))), [0.0, 0.0])
    assert metrics.spectral_norm(np.zeros((3, 0))).shape == ()


def test_spectral_norm_keeps_relative_accuracy_for_tiny_differences():
    rng = np.random.default_rng(0)
    x = 1e-9 * rng.standard_normal((512, 64))
    assert metrics.spectral_norm(x) == pytest.approx(np.linalg.svd(x, compute_uv=False)[0], rel=1e-12)


def test_rel_spectral_matches_the_svd_ratio():
    rng = np.random.default_rng(1)
    exact = rng.standard_normal((3, 300, 16))
    approx = exact + 0.01 * rng.standard_normal(exact.shape)
    expected = (np.linalg.norm(approx - exact, ord=2, axis=(-2, -1))
                / np.linalg.norm(exact, ord=2, axis=(-2, -1)))
    np.testing.assert_allclose(metrics.rel_spectral(approx, exact), expected, rtol=1e-12)
    np.testing.assert_array_equal(metrics.rel_spectral(exact, exact), np.zeros(3))
