"""Tests of ``local``: the spec's oracles, backend agreement, properties, gradients.

Expected values come from hand computation or from a dense masked softmax
over a band built here from first principles (``band_visible``), never from
the code under test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eff_attn
from eff_attn.testing import assert_close, finite_difference_vjp, random_qkv, to_host
from tests._harness import BackendCase
from tests._oracles import dense_attention, visible_matrix
from tests.methods._nonfinite import (
    check_float32_overflow_to_plus_inf_returns_that_keys_value,
    check_nan_input_gives_nan_rows,
    check_plus_inf_score_returns_that_keys_value,
)

CAUSAL_MODES = [False, True, "top_left"]


def band_visible(Nq, Nk, window, mask=None, causal=False):
    """(..., Nq, Nk) visibility of the band ``p_i - wL <= j <= p_i + wR``, from first principles."""
    wL, wR = (window, window) if np.isscalar(window) else window
    offset = 0 if causal == "top_left" else Nk - Nq                     # bottom-right unless top-left
    p = np.arange(Nq)[:, None] + offset
    j = np.arange(Nk)[None, :]
    if causal:
        wR = 0
    return visible_matrix(Nq, Nk, mask, causal) & (j >= p - wL) & (j <= p + wR)


def band_oracle(q, k, v, window, mask=None, causal=False, scale=None):
    return dense_attention(q, k, v, band_visible(q.shape[-2], k.shape[-2], window, mask, causal), scale=scale)


class TestLocal(BackendCase):
    METHOD = "local"
    BACKEND = "numpy"

    def tol(self, dtype):
        return 1e-10 if dtype == np.float64 else 1e-5

    def blocks(self):
        """(block_q, block_k) choices that put tile edges in awkward places."""
        return [(None, None), (1, 1), (3, 5)] if not self.small else [(2, 3)]

    # --- the spec's oracles -------------------------------------------------------

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_window_covering_every_key_equals_exact(self, causal, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (3, 5) if self.small else (9, 13)
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=4, Dv=3)
        mask = rng.random((2, Nk)) > 0.3
        exact, _ = dense_attention(q, k, v, visible_matrix(Nq, Nk, mask, causal))
        for block_q, block_k in self.blocks():
            out = self.run(q, k, v, mask=mask, causal=causal, window=max(Nq, Nk), block_q=block_q, block_k=block_k)
            assert_close(out, exact, rel=1e-12)

    def test_zero_window_returns_own_value(self, global_random_seed):
        N = 4 if self.small else 6
        q, k, v = random_qkv(global_random_seed, batch=(2,), Nq=N, Nk=N, D=3, Dv=2)
        for causal in CAUSAL_MODES:
            assert_close(self.run(q, k, v, window=0, causal=causal), v, rel=1e-12)

    def test_hand_value_with_zero_queries(self):
        v = np.array([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
        out = self.run(np.zeros((3, 2)), np.ones((3, 2)), v, window=1)
        expected = [(v[0] + v[1]) / 2, (v[0] + v[1] + v[2]) / 3, (v[1] + v[2]) / 2]
        assert_close(out, expected, rel=1e-12)

    def test_keys_outside_the_band_leave_rows_bitwise_unchanged(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        N, w = (6, 1) if self.small else (40, 3)
        q, k, v = random_qkv(rng, batch=(1,) if self.small else (2,), Nq=N, Nk=N, D=4, Dv=3)
        i = N // 2
        outside = np.abs(np.arange(N) - i) > w                             # keys outside row i's band
        k2, v2 = k.copy(), v.copy()
        k2[:, outside] = 50 * rng.standard_normal(k2[:, outside].shape)
        v2[:, outside] = 50 * rng.standard_normal(v2[:, outside].shape)
        for dtype in (np.float64, np.float32):
            a = to_host(self.run(*(x.astype(dtype) for x in (q, k, v)), window=w))
            b = to_host(self.run(*(x.astype(dtype) for x in (q, k2, v2)), window=w))
            assert np.array_equal(a[:, i], b[:, i])

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_equals_exact_with_a_dense_band_mask(self, causal, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (4, 6) if self.small else (37, 53)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=Nq, Nk=Nk, D=8, Dv=5)
        mask = rng.random((2, 1, Nk)) > 0.2
        for window in ((2, 1),) if self.small else ((5, 2), 7, (0, 11)):
            ref, ref_lse = band_oracle(q, k, v, window, mask, causal)
            for block_q, block_k in self.blocks():
                out, info = self.run(q, k, v, mask=mask, causal=causal, window=window, block_q=block_q,
                                     block_k=block_k, return_info=True)
                assert_close(out, ref, rel=1e-10)
                assert_close(info["lse"], ref_lse, rel=1e-10)

    def test_fully_masked_band_gives_zero_without_warnings(self):
        q, k, v = random_qkv(0, batch=(1,), Nq=6, Nk=6)
        mask = np.ones((1, 6), dtype=bool)
        mask[0, 1:4] = False                                               # row 2's band (w = 1) is keys 1-3
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, info = self.run(q, k, v, mask=mask, window=1, return_info=True)
        out, lse, empty = to_host(out), to_host(info["lse"]), to_host(info["empty_rows"])
        assert (out[0, 2] == 0).all() and np.isneginf(lse[0, 2])
        assert empty[0].tolist() == [False, False, True, False, False, False]
        ref, _ = band_oracle(q, k, v, 1, mask)
        assert_close(out, ref, rel=1e-12)

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_backward_matches_central_differences(self, causal):
        rng = np.random.default_rng(11)
        Nq, Nk = (3, 5) if self.small else (6, 9)
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=3, Dv=2)
        mask = rng.random((2, Nk)) > 0.25
        dout = rng.standard_normal((2, Nq, 2))
        window = (2, 1)
        vis = band_visible(Nq, Nk, window, mask, causal)
        expected = finite_difference_vjp(lambda a, b, c: dense_attention(a, b, c, vis)[0], [q, k, v], dout)
        for block_q, block_k in self.blocks():
            _, vjp = self.run_vjp(q, k, v, mask=mask, causal=causal, window=window, block_q=block_q, block_k=block_k)
            for name, g, e in zip("qkv", vjp(self.xp_in(dout)), expected):
                assert_close(g, e, rel=1e-7, what=f"d{name}")

    # --- alignment, parameters and info -----------------------------------------------

    def test_bottom_right_offset_applies_without_causal(self):
        q = np.zeros((2, 1))
        k = np.zeros((4, 1))
        v = np.arange(4.0)[:, None]
        # o = Nk - Nq = 2: query 0 sits at position 2, query 1 at 3.
        assert_close(self.run(q, k, v, window=0), [[2.0], [3.0]], rel=0)
        assert_close(self.run(q, k, v, window=(1, 0)), [[1.5], [2.5]], rel=1e-12)
        assert_close(self.run(q, k, v, window=(1, 0), causal="top_left"), [[0.0], [0.5]], rel=1e-12)

    def test_causal_forces_the_right_side_to_zero(self, global_random_seed):
        q, k, v = random_qkv(global_random_seed, batch=(2,), Nq=5, Nk=7)
        out, info = self.run(q, k, v, causal=True, window=(2, 9), return_info=True)
        assert info["params"]["window"] == (2, 0)
        assert_close(out, self.run(q, k, v, causal=True, window=(2, 0)), rel=0)
        assert_close(out, band_oracle(q, k, v, (2, 0), causal=True)[0], rel=1e-12)

    def test_masked_keys_holding_nan_have_no_effect(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        q, k, v = random_qkv(rng, batch=(2,), Nq=5, Nk=6, D=3, Dv=2)
        mask = rng.random((2, 6)) > 0.4
        k[~mask], v[~mask] = np.nan, np.inf
        ref, _ = band_oracle(q, np.where(mask[..., None], k, 0), np.where(mask[..., None], v, 0), 2, mask)
        assert_close(self.run(q, k, v, mask=mask, window=2, check_finite=False), ref, rel=1e-12)

    def test_info_counts_keys_and_computed_pairs(self):
        N, w = (8, 1) if self.small else (300, 5)
        q, k, v = random_qkv(1, batch=(2,), Nq=N, Nk=N, D=3, Dv=2)
        mask = np.ones((2, N), dtype=bool)
        mask[1, ::3] = False
        out, info = self.run(q, k, v, mask=mask, window=w, return_info=True)
        vis = band_visible(N, N, w, mask)
        assert info["method"] == "local" and info["backend"] == self.BACKEND
        assert info["keys_per_query"] == pytest.approx(vis.sum(-1).mean(), rel=1e-12)
        Bq = 16 if self.BACKEND == "numba" else 64                            # the default query block at w = 5
        assert vis.sum() <= info["computed_pairs"] <= 2 * (N + Bq) * (Bq + 2 * w)
        band_pairs = band_visible(N, N, w).sum()
        assert info["flops"] == 2 * band_pairs * (2 * 3 + 2 * 2 + 5)

    def test_bad_windows_raise_clear_errors(self):
        q, k, v = random_qkv(0)
        with pytest.raises(ValueError, match="window=-1 is too small"):
            self.run(q, k, v, window=-1)
        with pytest.raises(ValueError, match=r"window\[1\] \(wR\)=-2 is too small"):
            self.run(q, k, v, window=(1, -2))
        with pytest.raises(ValueError, match="pair"):
            self.run(q, k, v, window=(1, 2, 3))
        with pytest.raises(TypeError, match="window must be"):
            self.run(q, k, v, window=1.5)
        with pytest.raises(TypeError, match="has no parameter 'num_features'"):
            self.run(q, k, v, num_features=3)

    # --- agreement and properties --------------------------------------------------

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_agrees_with_float64_oracle(self, dtype, causal, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (3, 5) if self.small else (70, 150)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=Nq, Nk=Nk, D=8, Dv=5)
        mask = rng.random((2, 1, Nk)) > 0.2
        window = (2, 3) if self.small else (17, 9)
        ref, ref_lse = band_oracle(q, k, v, window, mask, causal)
        out, info = self.run(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask, causal=causal,
                             window=window, return_info=True)
        assert to_host(out).dtype == dtype
        assert_close(out, ref, rel=self.tol(dtype))
        assert_close(info["lse"], ref_lse, rel=self.tol(dtype))

    def test_property_shapes_windows_masks_and_dtypes(self):
        @settings(max_examples=self.examples, deadline=None)
        @given(
            Nq=st.integers(1, 9), Nk=st.integers(1, 9), D=st.integers(1, 4), Dv=st.integers(1, 3),
            lead=st.sampled_from([(), (1,), (2,), (2, 3)]), causal=st.sampled_from(CAUSAL_MODES),
            wL=st.integers(0, 10), wR=st.integers(0, 10), pair=st.booleans(), masked=st.booleans(),
            dtype=st.sampled_from([np.float32, np.float64]), big=st.booleans(),
            block_q=st.sampled_from([None, 1, 2, 4]), block_k=st.sampled_from([None, 1, 3]),
            seed=st.integers(0, 2**16),
        )
        def check(Nq, Nk, D, Dv, lead, causal, wL, wR, pair, masked, dtype, big, block_q, block_k, seed):
            rng = np.random.default_rng(seed)
            q, k, v = random_qkv(rng, batch=lead, Nq=Nq, Nk=Nk, D=D, Dv=Dv, scale=6.0 if big else 1.0)
            mask = rng.random((*lead, Nk)) > 0.4 if masked else None
            window = (wL, wR) if pair else wL
            ref, _ = band_oracle(q, k, v, window, mask, causal)
            out = self.run(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask, causal=causal,
                           window=window, block_q=block_q, block_k=block_k)
            assert np.isfinite(to_host(out)).all()
            assert_close(out, ref, rel=self.tol(dtype) * (10 if big else 1))

        check()

    def test_gradients_sum_over_broadcast_axes(self):
        rng = np.random.default_rng(5)
        q = rng.standard_normal((2, 3, 4, 3))
        k = rng.standard_normal((1, 5, 3))                                 # broadcast over the leading axes
        v = rng.standard_normal((3, 5, 2))
        dout = rng.standard_normal((2, 3, 4, 2))
        _, vjp = self.run_vjp(q, k, v, window=1)
        dq, dk, dv = vjp(self.xp_in(dout))
        assert to_host(dk).shape == (1, 5, 3) and to_host(dv).shape == (3, 5, 2)
        vis = band_visible(4, 5, 1)
        expected = finite_difference_vjp(
            lambda a, b, c: dense_attention(a, np.broadcast_to(b, (2, 3, 5, 3)), np.broadcast_to(c, (2, 3, 5, 2)),
                                            vis)[0],
            [q, k, v], dout,
        )
        for name, g, e in zip("qkv", (dq, dk, dv), expected):
            assert_close(g, e, rel=1e-7, what=f"d{name}")

    # --- non-finite scores (check_finite=False) ---------------------------------

    def test_nan_input_gives_nan_rows_not_zeros(self):
        check_nan_input_gives_nan_rows(self, window=4)

    def test_plus_inf_score_returns_that_keys_value(self):
        check_plus_inf_score_returns_that_keys_value(self, window=4)

    def test_float32_score_overflow_returns_that_keys_value(self):
        check_float32_overflow_to_plus_inf_returns_that_keys_value(self, window=4)


class TestLocalNumba(TestLocal):
    BACKEND = "numba"

    def test_long_sequence_computes_a_band_not_a_square(self):
        N, w = 1000, 8
        q, k, v = random_qkv(3, batch=(1,), Nq=N, Nk=N, D=4, Dv=2)
        out, info = self.run(q, k, v, window=w, block_q=16, return_info=True)
        assert info["computed_pairs"] <= N * (16 + 2 * w)                  # O(N w), not N^2
        assert_close(out, band_oracle(q, k, v, w)[0], rel=1e-10)


@pytest.mark.gpu
class TestLocalCupy(TestLocal):
    BACKEND = "cupy"


@pytest.mark.cudasim
class TestLocalCupyEmulated(TestLocal):
    BACKEND = "cupy"
    EMULATED = True


def test_flops_counts_band_pairs():
    from eff_attn.methods.local import flops

    # N = 5, w = 1: rows see 2, 3, 3, 3, 2 keys.
    assert flops(5, 5, 4, 2, window=1) == 13 * (2 * 4 + 2 * 2 + 5)
    assert flops(5, 5, 4, 2, window=(1, 0)) == 9 * (2 * 4 + 2 * 2 + 5)
    assert flops(5, 5, 4, 2, window=(1, 3), causal=True) == flops(5, 5, 4, 2, window=(1, 0))
    assert flops(4, 4, 1, window=100, batch=2) == 2 * 16 * 9
    assert flops(4, 4, 1, window=0, backward=True) == 4 * (9 + 15)


def test_budgets_sweep_windows_cheapest_first():
    from eff_attn.methods.local import METHOD

    windows = [b["window"] for b in METHOD.budgets]
    assert METHOD.budget_name == "window" and windows == sorted(windows) and 3 <= len(windows) <= 5
