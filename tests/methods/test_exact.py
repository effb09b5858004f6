"""Tests of ``exact``: the spec's oracles, backend agreement, properties, gradients.

Expected values come from hand computation, scipy's logsumexp
(``tests._oracles.dense_attention``) or torch's SDPA, never from the code
under test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

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


class TestExact(BackendCase):
    METHOD = "exact"
    BACKEND = "numpy"

    def tol(self, dtype):
        return 1e-10 if dtype == np.float64 else 1e-5

    # --- the spec's oracles -------------------------------------------------------

    def test_hand_value_matches_closed_form(self):
        q = np.array([[1.0, 0.0]])
        k = np.eye(2)
        v = np.array([[1.0], [0.0]])
        out, info = self.run(q, k, v, return_info=True)
        # softmax([1, 0] / sqrt 2) . [1, 0] = 1 / (1 + exp(-1/sqrt 2))
        assert_close(out, [[0.66976155]], rel=1e-8)
        assert_close(info["lse"], [1.10794031], rel=1e-8)

    def test_single_key_returns_its_value(self, global_random_seed):
        q, k, v = random_qkv(global_random_seed, batch=(2,), Nq=5, Nk=1, D=3, Dv=2)
        out = self.run(q, k, v)
        assert_close(out, np.broadcast_to(v, (2, 5, 2)), rel=1e-12)

    def test_shifting_all_keys_leaves_output_unchanged(self, global_random_seed):
        q, k, v = random_qkv(global_random_seed, Nq=6, Nk=7, D=4)
        u = np.random.default_rng(global_random_seed).standard_normal(4)
        assert_close(self.run(q, k + u, v), self.run(q, k, v), rel=1e-10)

    def test_joint_key_permutation_is_invariant(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        q, k, v = random_qkv(rng, Nq=5, Nk=9, D=4)
        mask = rng.random((2, 9)) > 0.3
        perm = rng.permutation(9)
        out = self.run(q, k, v, mask=mask)
        assert_close(self.run(q, k[:, perm], v[:, perm], mask=mask[:, perm]), out, rel=1e-10)

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    @pytest.mark.parametrize("blocks", [(1, 1), (3, 3), (64, 64), (2, 100)])
    def test_blocked_equals_naive(self, causal, blocks):
        rng = np.random.default_rng(7)
        Nq, Nk = (3, 5) if self.small else (7, 11)
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=3, Dv=2)
        mask = rng.random((2, Nk)) > 0.3
        block_q, block_k = blocks
        naive, _ = dense_attention(q, k, v, visible_matrix(Nq, Nk, mask, causal))
        out = self.run(q, k, v, mask=mask, causal=causal, algorithm="blocked", block_q=block_q, block_k=block_k)
        assert_close(out, naive, rel=1e-12)

    def test_large_scores_stay_finite_in_float32(self):
        rng = np.random.default_rng(3)
        D = 16
        q = rng.standard_normal((2, 6, D))
        k = rng.standard_normal((2, 8, D))
        v = rng.standard_normal((2, 8, 3))
        # Scale so the scaled scores reach about +-90 (exp(90) overflows float32).
        s = 90.0 / np.abs(np.einsum("gid,gjd->gij", q, k)).max()
        out32 = self.run(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), scale=s)
        ref, _ = dense_attention(q, k, v, True, scale=s)
        assert np.isfinite(to_host(out32)).all()
        assert_close(out32, ref, rel=1e-5)

    def test_bottom_right_and_top_left_alignment(self):
        q = np.zeros((2, 1))
        k = np.zeros((4, 1))
        v = np.arange(4.0)[:, None]
        # bottom-right: row 0 sits at position 2 and sees keys 0-2 (mean 1); top-left: key 0 only.
        assert_close(self.run(q, k, v, causal=True), [[1.0], [1.5]], rel=1e-12)
        assert_close(self.run(q, k, v, causal="top_left"), [[0.0], [0.5]], rel=1e-12)

    def test_more_queries_than_keys_gives_empty_leading_rows(self):
        q = np.ones((4, 2))
        k = np.ones((2, 2))
        v = np.array([[1.0, 2.0], [3.0, 4.0]])
        out, info = self.run(q, k, v, causal=True, return_info=True)
        assert_close(out[:2], np.zeros((2, 2)), rel=0, atol=0)
        assert_close(out[2:], [[1.0, 2.0], [2.0, 3.0]], rel=1e-12)
        assert to_host(info["empty_rows"]).tolist() == [True, True, False, False]

    def test_fully_masked_rows_give_zero_and_minus_inf_without_warnings(self):
        q, k, v = random_qkv(0, batch=(2,), Nq=3, Nk=5)
        mask = np.zeros((2, 5), dtype=bool)
        mask[1, 2] = True
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, info = self.run(q, k, v, mask=mask, return_info=True)
        out, lse = to_host(out), to_host(info["lse"])
        assert (out[0] == 0).all() and np.isneginf(lse[0]).all()
        assert_close(out[1], np.broadcast_to(v[1, 2], (3, 4)), rel=1e-12)
        assert to_host(info["empty_rows"]).tolist() == [[True] * 3, [False] * 3]

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_lse_equals_scipy_logsumexp(self, causal):
        q, k, v = random_qkv(1, batch=(3,), Nq=5, Nk=6)
        _, info = self.run(q, k, v, causal=causal, return_info=True)
        s = np.einsum("gid,gjd->gij", q, k) / 2.0
        s = np.where(visible_matrix(5, 6, None, causal), s, -np.inf)
        assert_close(info["lse"], logsumexp(s, axis=-1), rel=1e-12)

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_backward_matches_central_differences(self, causal):
        rng = np.random.default_rng(11)
        q, k, v = random_qkv(rng, batch=(2,), Nq=4, Nk=5, D=3, Dv=2)
        mask = np.array([[True, False, True, True, True], [True, True, True, False, True]])
        dout = rng.standard_normal((2, 4, 2))
        out, vjp = self.run_vjp(q, k, v, mask=mask, causal=causal)
        grads = vjp(self.xp_in(dout))
        expected = finite_difference_vjp(
            lambda a, b, c: dense_attention(a, b, c, visible_matrix(4, 5, mask, causal))[0], [q, k, v], dout
        )
        for name, g, e in zip("qkv", grads, expected):
            assert_close(g, e, rel=1e-7, what=f"d{name}")

    def test_gradients_sum_over_broadcast_axes(self):
        rng = np.random.default_rng(5)
        q = rng.standard_normal((2, 3, 4, 3))
        k = rng.standard_normal((1, 5, 3))   # broadcast over the 2 x 3 leading axes
        v = rng.standard_normal((3, 5, 2))   # broadcast over the first axis
        dout = rng.standard_normal((2, 3, 4, 2))
        _, vjp = self.run_vjp(q, k, v)
        dq, dk, dv = vjp(self.xp_in(dout))
        assert to_host(dk).shape == (1, 5, 3) and to_host(dv).shape == (3, 5, 2)
        expected = finite_difference_vjp(
            lambda a, b, c: dense_attention(a, np.broadcast_to(b, (2, 3, 5, 3)), np.broadcast_to(c, (2, 3, 5, 2)), True)[0],
            [q, k, v], dout,
        )
        for name, g, e in zip("qkv", (dq, dk, dv), expected):
            assert_close(g, e, rel=1e-7, what=f"d{name}")

    def test_matches_torch_sdpa_in_float64(self):
        if self.small:
            pytest.skip("covered by the host backends; too slow under the CUDA simulator")
        torch = pytest.importorskip("torch")
        q, k, v = random_qkv(2, batch=(2, 3), Nq=6, Nk=6, D=4)
        for causal in (False, True):
            ref = torch.nn.functional.scaled_dot_product_attention(
                *(torch.from_numpy(a) for a in (q, k, v)), is_causal=causal
            ).numpy()
            assert_close(self.run(q, k, v, causal=causal), ref, rel=1e-12)

    # --- agreement and properties --------------------------------------------------

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_agrees_with_float64_oracle(self, dtype, causal, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (3, 5) if self.small else (37, 53)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=Nq, Nk=Nk, D=8, Dv=5)
        mask = rng.random((2, 1, Nk)) > 0.2
        ref, ref_lse = dense_attention(q, k, v, visible_matrix(Nq, Nk, mask, causal))
        out, info = self.run(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask, causal=causal,
                             return_info=True)
        assert to_host(out).dtype == dtype
        assert_close(out, ref, rel=self.tol(dtype))
        assert_close(info["lse"], ref_lse, rel=self.tol(dtype))

    def test_real_attention_heads(self):
        from eff_attn.bench.problems import real_heads

        problem = real_heads(n=32 if self.small else 128, max_heads=2 if self.small else 8)
        q, k, v = problem.q, problem.k, problem.v
        ref, _ = dense_attention(q, k, v, True)
        assert_close(self.run(q, k, v), ref, rel=1e-12)
        assert_close(self.run(*(a.astype(np.float32) for a in (q, k, v))), ref, rel=1e-5)

    def test_property_shapes_masks_and_dtypes(self):
        @settings(max_examples=self.examples, deadline=None)
        @given(
            Nq=st.integers(1, 9), Nk=st.integers(1, 9), D=st.integers(1, 5), Dv=st.integers(1, 4),
            lead=st.sampled_from([(), (1,), (2,), (2, 3)]), causal=st.sampled_from(CAUSAL_MODES),
            masked=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
            big=st.booleans(), seed=st.integers(0, 2**16),
        )
        def check(Nq, Nk, D, Dv, lead, causal, masked, dtype, big, seed):
            rng = np.random.default_rng(seed)
            q, k, v = random_qkv(rng, batch=lead, Nq=Nq, Nk=Nk, D=D, Dv=Dv, scale=6.0 if big else 1.0)
            mask = rng.random((*lead, Nk)) > 0.4 if masked else None
            ref, _ = dense_attention(q, k, v, visible_matrix(Nq, Nk, mask, causal))
            out = self.run(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask, causal=causal)
            assert np.isfinite(to_host(out)).all()
            assert_close(out, ref, rel=self.tol(dtype) * (10 if big else 1))

        check()

    # --- non-finite scores (check_finite=False) ---------------------------------

    def test_nan_input_gives_nan_rows_not_zeros(self):
        check_nan_input_gives_nan_rows(self)

    def test_plus_inf_score_returns_that_keys_value(self):
        check_plus_inf_score_returns_that_keys_value(self)

    def test_float32_score_overflow_returns_that_keys_value(self):
        check_float32_overflow_to_plus_inf_returns_that_keys_value(self)

    def test_info_has_the_base_keys_and_flops(self):
        q, k, v = random_qkv(0, batch=(2,), Nq=4, Nk=6, D=3, Dv=5)
        _, info = self.run(q, k, v, causal=True, return_info=True)
        assert info["method"] == "exact" and info["backend"] == self.BACKEND
        assert {"params", "flops", "empty_rows", "lse", "algorithm", "block_q", "block_k"} <= set(info)
        causal_pairs = sum(min(6, i + 2 + 1) for i in range(4))  # offset Nk - Nq = 2
        assert info["flops"] == 2 * causal_pairs * (2 * 3 + 2 * 5 + 5)


class TestExactNumba(TestExact):
    BACKEND = "numba"

    def test_naive_algorithm_is_refused_with_reasons(self):
        q, k, v = random_qkv(0)
        with pytest.raises(eff_attn.NotSupportedError, match="exact/numba: .*naive"):
            self.run(q, k, v, algorithm="naive")


@pytest.mark.gpu
class TestExactCupy(TestExactNumba):
    BACKEND = "cupy"


@pytest.mark.cudasim
class TestExactCupyEmulated(TestExactNumba):
    BACKEND = "cupy"
    EMULATED = True


def test_flops_counts_pairs_and_halves_for_causal():
    from eff_attn.methods.exact import flops

    assert flops(64, 64, 32, 16) == 64 * 64 * (2 * 32 + 2 * 16 + 5)
    assert flops(64, 64, 32, batch=3) == 3 * 64 * 64 * (4 * 32 + 5)
    assert flops(4, 4, 1, causal=True) == 10 * 9
    assert flops(4, 4, 1, backward=True) == 16 * (9 + 15)
