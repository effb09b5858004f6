"""Tests of ``nystrom``: the spec's oracles, backend agreement, properties, gradients.

Expected values come from hand computation, ``tests._oracles.dense_attention``
(exact softmax by scipy's logsumexp) or ``nystrom_oracle`` below: a
slice-by-slice loop over explicit segments that drops invalid landmarks and
uses ``numpy.linalg.pinv`` or a plain loop for the iteration. None of them
calls the package's code.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import softmax

import eff_attn
from eff_attn.testing import assert_close, finite_difference_vjp, random_qkv, relative_error, to_host
from tests._harness import BackendCase
from tests._oracles import dense_attention


def _iterate_pinv(A, iters):
    """Plain loop of the spec's iteration on one (m, m) matrix."""
    Z = A.T / (A.sum(axis=0).max() * A.sum(axis=1).max())
    I = np.eye(len(A))
    for _ in range(iters):
        T = A @ Z
        Z = 0.25 * Z @ (13 * I - T @ (15 * I - T @ (7 * I - T)))
    return Z


def nystrom_oracle(q, k, v, m, mask=None, pinv="exact", iters=6, scale=None):
    """Nystrom attention slice by slice, float64, invalid landmarks dropped."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], () if mask is None else mask.shape[:-1])
    Nq, Nk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    q, k, v = (np.broadcast_to(a, (*lead, *a.shape[-2:])).reshape(-1, *a.shape[-2:]) for a in (q, k, v))
    keep = np.ones((len(q), Nk), bool) if mask is None else np.broadcast_to(mask, (*lead, Nk)).reshape(-1, Nk)
    s = 1 / np.sqrt(D) if scale is None else scale
    out = np.zeros((len(q), Nq, v.shape[-1]))
    for g in range(len(q)):
        keep_q = keep[g] if Nq == Nk else np.ones(Nq, bool)
        q_hat = [q[g, t * Nq // m:(t + 1) * Nq // m][keep_q[t * Nq // m:(t + 1) * Nq // m]] for t in range(m)]
        k_hat = [k[g, t * Nk // m:(t + 1) * Nk // m][keep[g, t * Nk // m:(t + 1) * Nk // m]] for t in range(m)]
        q_hat = np.array([x.mean(axis=0) for x in q_hat if len(x)]).reshape(-1, D)
        k_hat = np.array([x.mean(axis=0) for x in k_hat if len(x)]).reshape(-1, D)
        if len(k_hat) == 0:
            continue  # every key masked: the row is empty
        F = softmax(s * q[g] @ k_hat.T, axis=-1)
        A = softmax(s * q_hat @ k_hat.T, axis=-1)
        B = softmax(np.where(keep[g], s * q_hat @ k[g].T, -np.inf), axis=-1)
        Z = np.linalg.pinv(A) if pinv == "exact" else _iterate_pinv(A, iters)
        out[g] = F @ Z @ B @ v[g]
    return out.reshape(*lead, Nq, -1)


class TestNystrom(BackendCase):
    METHOD = "nystrom"
    BACKEND = "numpy"

    def reference(self, q, k, v, **kw):
        """The NumPy backend's output (the agreement target of the other backends)."""
        return eff_attn.attention(q, k, v, method="nystrom", backend="numpy", **kw)

    # --- the spec's oracles -------------------------------------------------------

    @pytest.mark.parametrize("masked", [False, True])
    def test_as_many_landmarks_as_tokens_with_exact_pinv_equals_exact(self, masked):
        rng = np.random.default_rng(0)
        N = 5 if self.small else 12
        q, k, v = random_qkv(rng, batch=(2,), Nq=N, D=4, Dv=3)
        mask = rng.random((2, N)) > 0.3 if masked else None
        expected, _ = dense_attention(q, k, v, True if mask is None else mask[:, None, :])
        assert_close(self.run(q, k, v, mask=mask, num_landmarks=N, pinv="exact"), expected, rel=1e-10)

    def test_one_landmark_gives_softmax_against_the_mean_query(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        q, k, v = random_qkv(rng, batch=(3,), Nq=6, Nk=9, D=4, Dv=2)
        q_bar = q.mean(axis=-2, keepdims=True)                                  # (3, 1, 4)
        row = softmax(q_bar @ np.swapaxes(k, -1, -2) / 2.0, axis=-1) @ v        # (3, 1, 2)
        assert_close(self.run(q, k, v, num_landmarks=1), np.broadcast_to(row, (3, 6, 2)), rel=1e-12)

    def test_one_landmark_mean_skips_masked_positions_when_nq_equals_nk(self):
        rng = np.random.default_rng(3)
        q, k, v = random_qkv(rng, batch=(1,), Nq=6, D=4, Dv=2)
        mask = np.array([[True, False, True, True, False, True]])
        q_bar = q[:, mask[0]].mean(axis=-2, keepdims=True)                      # (1, 1, 4)
        scores = np.where(mask[:, None, :], q_bar @ np.swapaxes(k, -1, -2) / 2.0, -np.inf)
        row = softmax(scores, axis=-1) @ v                                      # (1, 1, 2)
        assert_close(self.run(q, k, v, mask=mask, num_landmarks=1), np.broadcast_to(row, (1, 6, 2)), rel=1e-12)

    @pytest.mark.parametrize("m", [16, 64])
    def test_six_iterations_converge_on_a_4I_score_matrix(self, m):
        D = m
        U = np.linalg.qr(np.random.default_rng(m).standard_normal((D, D)))[0][:m]  # (m, D), orthonormal rows
        q = 2 * D**0.25 * U                                                     # s q q^T = 4 I
        v = np.random.default_rng(1).standard_normal((m, 3))
        _, info = self.run(q, q, v, num_landmarks=m, return_info=True)
        assert info["pinv_residual"] <= 1e-10
        _, info1 = self.run(q, q, v, num_landmarks=m, pinv_iters=1, return_info=True)
        assert info1["pinv_residual"] > 1e-3  # one step is not enough: the bound above is not vacuous

    @pytest.mark.parametrize("pinv_iters", [1, 6])
    def test_heads_computed_together_equal_heads_one_at_a_time(self, pinv_iters):
        rng = np.random.default_rng(5)
        N = 8 if self.small else 40
        q, k, v = random_qkv(rng, batch=(4,), Nq=N, D=8, Dv=3)
        q *= np.array([0.3, 1.0, 3.0, 6.0])[:, None, None]   # very different A per head, so Z0 differs
        together = to_host(self.run(q, k, v, num_landmarks=6, pinv_iters=pinv_iters))
        for h in range(4):
            alone = self.run(q[h], k[h], v[h], num_landmarks=6, pinv_iters=pinv_iters)
            assert_close(alone, together[h], rel=1e-13, what=f"head {h}")

    @pytest.mark.parametrize("N, m, sizes", [(7, 3, [2, 2, 3]), (5, 2, [2, 3]), (6, 6, [1] * 6)])
    def test_floor_segments(self, N, m, sizes):
        q, k, v = random_qkv(2, batch=(2,), Nq=N, Nk=N + 2 if N > m else N, D=3)
        out, info = self.run(q, k, v, num_landmarks=m, pinv="exact", return_info=True)
        assert info["segment_sizes"]["q"].tolist() == sizes
        assert_close(out, nystrom_oracle(q, k, v, m), rel=1e-10)

    @pytest.mark.parametrize("pinv", ["exact", "iterative"])
    def test_matches_independent_oracle(self, pinv, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (5, 7) if self.small else (23, 31)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=Nq, Nk=Nk, D=6, Dv=4)
        mask = rng.random((2, 1, Nk)) > 0.25
        out = self.run(q, k, v, mask=mask, num_landmarks=4, pinv=pinv)
        assert_close(out, nystrom_oracle(q, k, v, 4, mask, pinv=pinv), rel=1e-10)

    def test_masked_keys_have_no_effect(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        N = 7 if self.small else 20
        q, k, v = random_qkv(rng, batch=(2,), Nq=N, D=4)
        mask = rng.random((2, N)) > 0.3
        k2, v2 = k.copy(), v.copy()
        k2[~mask] = 50 * rng.standard_normal(k2[~mask].shape)
        v2[~mask] = 50 * rng.standard_normal(v2[~mask].shape)
        out = to_host(self.run(q, k, v, mask=mask, num_landmarks=3))
        assert_close(self.run(q, k2, v2, mask=mask, num_landmarks=3), out, rel=1e-12)
        # A masked position's query moves its own output row only.
        q2 = q.copy()
        q2[~mask] += 5.0
        out2 = to_host(self.run(q2, k, v, mask=mask, num_landmarks=3))
        assert_close(out2[mask], out[mask], rel=1e-12)

    def test_constant_values_give_constant_output_with_exact_pinv(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        q, k, _ = random_qkv(rng, batch=(3,), Nq=9, Nk=11, D=4)
        v = np.broadcast_to(np.array([1.5, -2.0]), (3, 11, 2)).copy()
        assert_close(self.run(q, k, v, num_landmarks=5, pinv="exact"), np.broadcast_to(v[:, :1], (3, 9, 2)), rel=1e-10)

    def test_causal_is_refused_with_the_reason(self):
        q, k, v = random_qkv(0)
        with pytest.raises(eff_attn.NotSupportedError, match="landmarks average the whole sequence"):
            self.run(q, k, v, causal=True, num_landmarks=2)

    # --- invalid landmarks and empty rows -------------------------------------------

    def test_invalid_landmarks_are_reported_and_left_out(self):
        rng = np.random.default_rng(4)
        q, k, v = random_qkv(rng, batch=(2,), Nq=9, D=4, Dv=3)
        mask = np.ones((2, 9), dtype=bool)
        mask[0, 3:6] = False                       # m = 3: segment 1 of slice 0 keeps no token
        out, info = self.run(q, k, v, mask=mask, num_landmarks=3, return_info=True)
        assert to_host(info["invalid_landmarks"]["k"]).tolist() == [[False, True, False], [False] * 3]
        assert to_host(info["invalid_landmarks"]["q"]).tolist() == [[False, True, False], [False] * 3]
        assert np.isfinite(to_host(out)).all()
        assert_close(out, nystrom_oracle(q, k, v, 3, mask, pinv="iterative"), rel=1e-10)

    def test_fully_masked_slice_gives_zero_rows_without_warnings(self):
        q, k, v = random_qkv(0, batch=(2,), Nq=5, Nk=6)
        mask = np.ones((2, 6), dtype=bool)
        mask[1] = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, info = self.run(q, k, v, mask=mask, num_landmarks=2, return_info=True)
        assert (to_host(out)[1] == 0).all()
        assert to_host(info["empty_rows"]).tolist() == [[False] * 5, [True] * 5]
        assert to_host(info["invalid_landmarks"]["k"])[1].all()
        assert_close(to_host(out)[0], nystrom_oracle(q[0], k[0], v[0], 2), rel=1e-10)

    # --- backward ---------------------------------------------------------------------

    @pytest.mark.parametrize("pinv", ["iterative", "exact"])
    @pytest.mark.parametrize("Nq, Nk", [(7, 7), (5, 8)])
    def test_backward_matches_central_differences(self, pinv, Nq, Nk):
        rng = np.random.default_rng(11)
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=3, Dv=2)
        mask = rng.random((2, Nk)) > 0.25
        mask[:, 0] = True
        dout = rng.standard_normal((2, Nq, 2))
        kw = dict(mask=mask, num_landmarks=3, pinv=pinv)
        _, vjp = self.run_vjp(q, k, v, **kw)
        grads = vjp(self.xp_in(dout))
        expected = finite_difference_vjp(lambda a, b, c: nystrom_oracle(a, b, c, 3, mask, pinv=pinv), [q, k, v], dout)
        for name, g, e in zip("qkv", grads, expected):
            assert_close(g, e, rel=1e-7, what=f"d{name}")

    # --- agreement and properties --------------------------------------------------

    def assert_float32_within_twice_numpy(self, q, k, v, **kw):
        """The spec's float32 rule: error vs float64 at most 2x NumPy's float32 error + 1e-6."""
        ref64 = to_host(self.reference(q, k, v, **kw))
        q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
        out32 = self.run(q32, k32, v32, **kw)
        assert to_host(out32).dtype == np.float32
        numpy_error = relative_error(self.reference(q32, k32, v32, **kw), ref64)
        assert numpy_error <= 1e-4
        assert relative_error(out32, ref64) <= 2 * numpy_error + 1e-6

    @pytest.mark.parametrize("pinv", ["iterative", "exact"])
    def test_float64_agrees_with_the_numpy_reference(self, pinv, global_random_seed, numpy_reference):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (5, 7) if self.small else (45, 61)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=Nq, Nk=Nk, D=8, Dv=5)
        mask = rng.random((2, 1, Nk)) > 0.2
        kw = dict(mask=mask, num_landmarks=5, pinv=pinv)
        assert_close(self.run(q, k, v, **kw), numpy_reference.run(q, k, v, **kw), rel=1e-10)

    def test_float32_iterative_error_within_twice_numpy(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (5, 7) if self.small else (45, 61)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=Nq, Nk=Nk, D=8, Dv=5)
        mask = rng.random((2, 1, Nk)) > 0.2
        self.assert_float32_within_twice_numpy(q, k, v, mask=mask, num_landmarks=5)

    def test_float32_exact_pinv_error_within_twice_numpy_when_A_is_well_conditioned(self, global_random_seed):
        # With pinv="exact" the float32 error is kappa(A) times the rounding of A, and
        # on near-uniform heads (kappa in the thousands) it varies by 10x between
        # summation orders. Here each segment holds noisy copies of its own direction,
        # so A is near 4I-softmax (kappa < 10) and the rule is meaningful.
        rng = np.random.default_rng(global_random_seed)
        m, per, D = (3, 2, 4) if self.small else (8, 5, 8)
        dirs = 2 * D**0.25 * np.linalg.qr(rng.standard_normal((D, D)))[0][:m]     # (m, D)
        q = np.repeat(dirs, per, axis=0) + 0.05 * rng.standard_normal((2, m * per, D))
        k = np.repeat(dirs, per, axis=0) + 0.05 * rng.standard_normal((2, m * per, D))
        v = rng.standard_normal((2, m * per, 3))
        self.assert_float32_within_twice_numpy(q, k, v, num_landmarks=m, pinv="exact")

    def test_property_shapes_masks_and_dtypes(self):
        @settings(max_examples=self.examples, deadline=None)
        @given(
            Nq=st.integers(1, 9), Nk=st.integers(1, 9), D=st.integers(1, 5), Dv=st.integers(1, 4),
            lead=st.sampled_from([(), (1,), (2,), (2, 3)]), masked=st.booleans(),
            dtype=st.sampled_from([np.float32, np.float64]), big=st.booleans(),
            pinv=st.sampled_from(["iterative", "exact"]), data=st.data(),
        )
        def check(Nq, Nk, D, Dv, lead, masked, dtype, big, pinv, data):
            m = data.draw(st.integers(1, min(Nq, Nk)), label="m")
            rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
            q, k, v = random_qkv(rng, batch=lead, Nq=Nq, Nk=Nk, D=D, Dv=Dv, scale=6.0 if big else 1.0)
            mask = rng.random((*lead, Nk)) > 0.4 if masked else None
            kw = dict(mask=mask, num_landmarks=m, pinv=pinv)
            out = to_host(self.run(*(a.astype(dtype) for a in (q, k, v)), **kw))
            assert out.dtype == dtype and out.shape == (*lead, Nq, Dv)
            assert np.isfinite(out).all()
            if dtype == np.float64 and pinv == "iterative":
                assert_close(out, nystrom_oracle(q, k, v, m, mask, pinv="iterative"), rel=1e-9)
            elif dtype == np.float64 and not big:  # the SVD cutoff makes ill-conditioned A differ by far more
                assert_close(out, nystrom_oracle(q, k, v, m, mask, pinv="exact"), rel=1e-8)

        check()

    def test_info_has_the_base_keys_and_flops(self):
        q, k, v = random_qkv(0, batch=(2,), Nq=7, Nk=10, D=3, Dv=5)
        _, info = self.run(q, k, v, num_landmarks=4, return_info=True)
        assert info["method"] == "nystrom" and info["backend"] == self.BACKEND
        assert {"params", "flops", "empty_rows", "pinv_residual", "segment_sizes", "invalid_landmarks"} <= set(info)
        assert info["params"] == {"num_landmarks": 4, "pinv": "iterative", "pinv_iters": 6}
        one_slice = 2 * 4 * 17 * 8 + 2 * 16 * 8 + 8 * 64 * 6 + 5 * 4 * (17 + 4)  # m=4, Nq+Nk=17, D+Dv=8
        assert info["flops"] == 2 * one_slice
        assert info["segment_sizes"]["k"].tolist() == [2, 3, 2, 3]

    def test_default_landmarks_are_capped_by_the_sequence(self):
        q, k, v = random_qkv(0, batch=(1,), Nq=5, Nk=9, D=3)
        _, info = self.run(q, k, v, return_info=True)
        assert info["params"]["num_landmarks"] == 5

    # --- bad input ---------------------------------------------------------------------

    def test_bad_parameters_raise_clear_errors(self):
        q, k, v = random_qkv(0, batch=(1,), Nq=4, Nk=6, D=3)
        with pytest.raises(ValueError, match="num_landmarks=5 is too large; it must be at most 4"):
            self.run(q, k, v, num_landmarks=5)
        with pytest.raises(ValueError, match="num_landmarks=0 is too small"):
            self.run(q, k, v, num_landmarks=0)
        with pytest.raises(TypeError, match="num_landmarks must be an integer"):
            self.run(q, k, v, num_landmarks=2.5)
        with pytest.raises(ValueError, match="pinv='svd' is not one of 'iterative', 'exact'"):
            self.run(q, k, v, pinv="svd")
        with pytest.raises(ValueError, match="pinv_iters=-1 is too small"):
            self.run(q, k, v, pinv_iters=-1)
        with pytest.raises(TypeError, match="no parameter 'landmarks'"):
            self.run(q, k, v, landmarks=2)


class TestNystromNumba(TestNystrom):
    BACKEND = "numba"

    def test_backward_matches_central_differences(self, pinv="iterative", Nq=5, Nk=5):
        q, k, v = random_qkv(0, batch=(1,), Nq=Nq, Nk=Nk, D=3)
        with pytest.raises(eff_attn.NotSupportedError, match="nystrom/numba: has no backward pass"):
            self.run_vjp(q, k, v, num_landmarks=2)


@pytest.mark.gpu
class TestNystromCupy(TestNystrom):
    BACKEND = "cupy"


@pytest.mark.cudasim
class TestNystromCupyEmulated(TestNystrom):
    BACKEND = "cupy"
    EMULATED = True


def test_flops_follow_the_documented_count():
    from eff_attn.methods.nystrom import flops

    m, Nq, Nk, D, Dv = 8, 100, 120, 16, 12
    forward = 2 * m * (Nq + Nk) * (D + Dv) + 2 * m * m * (D + Dv) + 8 * m**3 * 6 + 5 * m * (Nq + Nk + m)
    assert flops(Nq, Nk, D, Dv, num_landmarks=m) == forward
    assert flops(Nq, Nk, D, Dv, num_landmarks=m, batch=3) == 3 * forward
    exact = forward - 8 * m**3 * 6 + 23 * m**3
    assert flops(Nq, Nk, D, Dv, num_landmarks=m, pinv="exact") == exact
    backward = 4 * m * (Nq + Nk) * (D + Dv) + 4 * m * m * (D + Dv) + 22 * m**3 * 6 + 4 * m * (Nq + Nk + m)
    assert flops(Nq, Nk, D, Dv, num_landmarks=m, backward=True) == forward + backward
