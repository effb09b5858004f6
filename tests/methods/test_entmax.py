"""Tests of ``entmax`` and the transforms: the spec's oracles, agreement, properties, gradients.

Expected values come from the spec's hand computations, from an independent
float64 oracle that finds ``tau`` with scipy's Brent root finder
(:func:`entmax_oracle`), from scipy's softmax, or from finite differences;
never from the code under test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.special import softmax

import eff_attn
from eff_attn.testing import assert_close, finite_difference_vjp, random_qkv, to_host
from tests._harness import BackendCase
from tests._oracles import dense_attention, visible_matrix

CAUSAL_MODES = [False, True, "top_left"]
Z = np.array([-2.0, 0.0, 0.5])


def entmax_oracle(z, alpha, visible=None):
    """alpha-entmax of the last axis in float64, ``tau`` by Brent's method (independent of the package)."""
    z = np.asarray(z, dtype=np.float64)
    visible = np.broadcast_to(np.ones(z.shape, bool) if visible is None else visible, z.shape)
    out = np.zeros(z.shape)
    for index in np.ndindex(*z.shape[:-1]):
        keep = visible[index]
        if not keep.any():
            continue
        row = z[index][keep]
        if alpha == 1:
            out[index + (keep,)] = softmax(row)
            continue
        y, beta = (alpha - 1) * row, 1 / (alpha - 1)
        f = lambda t: np.sum(np.maximum(y - t, 0) ** beta) - 1  # noqa: E731
        tau = brentq(f, y.max() - 1.5, y.max(), xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)
        out[index + (keep,)] = np.maximum(y - tau, 0) ** beta
    return out


def attention_oracle(q, k, v, visible, alpha, scale=None):
    """``entmax_oracle(s q k^T on the visible set) v`` in float64."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * np.einsum("...id,...jd->...ij", q, k)
    P = entmax_oracle(s, alpha, np.broadcast_to(visible, s.shape))
    return np.einsum("...ij,...jd->...id", P, v)


class TestEntmax(BackendCase):
    METHOD = "entmax"
    BACKEND = "numpy"

    def tol(self, dtype):
        return 1e-10 if dtype == np.float64 else 1e-5

    def tf(self, fn, z, *args, **kw):
        """A transform of ``eff_attn`` on this backend."""
        if "mask" in kw:
            kw["mask"] = self.xp_in(kw["mask"])
        return fn(self.xp_in(np.asarray(z)), *args, backend=self.BACKEND, **kw)

    # --- the spec's oracles: transforms ---------------------------------------------

    def test_hand_values_of_the_three_transforms(self):
        p, info = self.tf(eff_attn.entmax_bisect, Z, 1.0, return_info=True)
        assert_close(p, [0.04861082, 0.35918811, 0.59220107], rel=1e-8)
        p, info = self.tf(eff_attn.sparsemax, Z, return_info=True)
        assert_close(p, [0.0, 0.25, 0.75], rel=1e-12)
        assert_close(info["tau"], -0.25, rel=1e-12)
        assert int(info["support_size"]) == 2
        p, info = self.tf(eff_attn.entmax15, Z, return_info=True)
        assert_close(p, [0.0, 0.32600736, 0.67399264], rel=1e-8)
        assert_close(info["tau"], -0.57097055, rel=1e-8)
        assert_close(self.tf(eff_attn.entmax_bisect, Z, 2.0), [0.0, 0.25, 0.75], rel=1e-12)
        assert_close(self.tf(eff_attn.entmax_bisect, Z, 1.5), self.tf(eff_attn.entmax15, Z), rel=1e-12)

    def test_vjp_hand_values(self):
        g = np.array([1.0, 2.0, 3.0])
        _, vjp = self.tf(eff_attn.sparsemax_vjp, Z)
        assert_close(vjp(self.xp_in(g)), [0.0, -0.5, 0.5], rel=1e-12)
        _, vjp = self.tf(eff_attn.entmax15_vjp, Z)
        assert_close(vjp(self.xp_in(g)), [0.0, -0.33675994, 0.33675994], rel=1e-8)

    def test_bisect_alpha_133_hand_values_and_alpha_gradient(self):
        p, vjp = self.tf(eff_attn.entmax_bisect_vjp, [-1.0, 0.0, 0.5], 1.33)
        assert_close(p, [0.04598203, 0.32763225, 0.62638572], rel=1e-8)
        _, dalpha = vjp(self.xp_in(np.array([1.0, 0.0, 0.0])))
        assert dalpha == pytest.approx(-0.25616772, abs=1e-8)
        assert_close(self.tf(eff_attn.entmax_bisect, [1.0, 2.0, 3.5], 1.33),
                     [0.00255806, 0.10115538, 0.89628656], rel=1e-8)

    def test_entmax15_depends_only_on_the_top_of_the_row(self):
        expected = [0.0, 0.67399264, 0.32600736, 0.0]
        assert_close(self.tf(eff_attn.entmax15, [1.3, 20.0, 19.5, 1.0]), expected, rel=1e-8)
        assert_close(self.tf(eff_attn.entmax15, [0.0, 20.0, 19.5, 0.0]), expected, rel=1e-8)

    @pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0, 2.5])
    def test_matches_independent_brent_oracle(self, alpha, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        z = rng.standard_normal((3, 4, 17 if not self.small else 5)) * 3
        mask = rng.random(z.shape) > 0.25
        fn = eff_attn.entmax15 if alpha == 1.5 else (eff_attn.sparsemax if alpha == 2 else None)
        p = self.tf(eff_attn.entmax_bisect, z, alpha, mask=mask) if fn is None else self.tf(fn, z, mask=mask)
        assert_close(p, entmax_oracle(z, alpha, mask), rel=1e-10)

    def test_rows_sum_to_one_and_bisect_overshoots_by_at_most_1e9(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        n = 8 if self.small else 512
        z = rng.standard_normal((4, n)) * rng.uniform(0.1, 10, (4, 1))
        for fn in (eff_attn.sparsemax, eff_attn.entmax15):
            p = to_host(self.tf(fn, z))
            assert (p >= 0).all()
            assert_close(p.sum(-1), np.ones(4), rel=0, atol=1e-12)
        for alpha in (1.1, 1.3, 1.7, 2.0, 2.5, 3.0):
            p = to_host(self.tf(eff_attn.entmax_bisect, z, alpha, ensure_sum_one=False))
            total = p.sum(-1)
            assert (total >= 1).all(), (alpha, total)
            if alpha <= 2:
                assert (total <= 1 + 1e-9).all(), (alpha, total)

    def test_shift_permutation_order_kkt_bracket_and_guaranteed_zeros(self):
        alphas = [1.25, 1.5, 2.0, 2.5]

        @settings(max_examples=self.examples, deadline=None)
        @given(n=st.integers(1, 40), seed=st.integers(0, 2**16), alpha=st.sampled_from(alphas),
               scale=st.sampled_from([1e-3, 1.0, 30.0]))
        def check(n, seed, alpha, scale):
            rng = np.random.default_rng(seed)
            z = rng.standard_normal(n) * scale
            p, info = self.tf(eff_attn.entmax_bisect, z, alpha, return_info=True)
            p, tau = to_host(p), float(info["tau"])
            shifted = to_host(self.tf(eff_attn.entmax_bisect, z + 7.25, alpha))
            assert_close(shifted, p, rel=1e-9, atol=1e-12)
            perm = rng.permutation(n)
            assert_close(to_host(self.tf(eff_attn.entmax_bisect, z[perm], alpha)), p[perm], rel=1e-9, atol=1e-12)
            order = np.argsort(z)
            assert (np.diff(p[order]) >= -1e-12).all()                          # order preserving
            y = (alpha - 1) * z                                                 # KKT in unshifted units
            on = p > 0
            assert_close(p[on] ** (alpha - 1), y[on] - tau, rel=1e-7, atol=1e-9)
            assert (y[~on] <= tau + 1e-9).all()
            x_tau = tau - (alpha - 1) * z.max()                                 # tau in shifted units
            assert -1 - 1e-12 <= x_tau <= -(n ** (1 - alpha)) + 1e-12
            assert (p[(alpha - 1) * (z - z.max()) <= -1] == 0).all()            # guaranteed zeros

        check()

    @pytest.mark.parametrize("scale", [1e-3, 1e-1, 1.0, 1e2, 1e3])
    def test_sort_equals_bisect_and_support_sizes_match(self, scale, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        n = 6 if self.small else 512
        z = rng.standard_normal((3, n)) * scale
        z[0, : n // 2] = z[0, 0]                                                # ties, and the delta < 0 clamp
        for fn, alpha in ((eff_attn.sparsemax, 2.0), (eff_attn.entmax15, 1.5)):
            p, info = self.tf(fn, z, return_info=True)
            pb, info_b = self.tf(eff_attn.entmax_bisect, z, alpha, return_info=True)
            assert_close(pb, p, rel=1e-10)
            assert (to_host(info_b["support_size"]) == to_host(info["support_size"])).all()

    def test_alpha_one_is_softmax_and_one_plus_eps_is_close(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        z = rng.uniform(-10, 10, (5, 3 if self.small else 64))
        p1 = self.tf(eff_attn.entmax_bisect, z, 1.0)
        if self.BACKEND == "numpy":
            from eff_attn._softmax import softmax_attend

            _, _, expected = softmax_attend(z, np.ones(z.shape, bool), np.zeros((z.shape[-1], 0)))
            assert (to_host(p1) == expected).all()                              # bitwise the softmax path
        assert_close(p1, softmax(z, axis=-1), rel=1e-12)
        for eps in (1e-2, 1e-3):
            p = self.tf(eff_attn.entmax_bisect, z, 1 + eps)
            assert np.abs(to_host(p) - softmax(z, axis=-1)).max() <= 3 * eps

    def test_masked_entries_are_zero_and_the_rest_is_the_short_vector(self):
        rng = np.random.default_rng(4)
        z = rng.standard_normal((3, 9)) * 2
        mask = np.ones((3, 9), bool)
        mask[0, [1, 4, 5]] = False
        mask[2] = False                                                        # an all-masked row
        with np.errstate(all="raise"), warnings.catch_warnings():
            warnings.simplefilter("error")
            for fn, args in ((eff_attn.sparsemax, ()), (eff_attn.entmax15, ()), (eff_attn.entmax_bisect, (1.3,)),
                             (eff_attn.entmax_bisect, (1.0,))):
                p, info = self.tf(fn, z, *args, mask=mask, return_info=True)
                p = to_host(p)
                assert (p[~mask] == 0).all() and (p[2] == 0).all()
                assert np.isposinf(to_host(info["tau"])[2]) and to_host(info["support_size"])[2] == 0
                short = to_host(self.tf(fn, z[0, mask[0]], *args))
                assert_close(p[0, mask[0]], short, rel=1e-12)

    def test_mean_support_of_gaussian_rows(self):
        if self.small:
            pytest.skip("400-row statistics: covered by the host backends; too slow under the CUDA simulator")
        rng = np.random.default_rng(0)
        cases = [(eff_attn.entmax15, 64, 1.0, 10.08, 0.70), (eff_attn.entmax15, 64, 2.0, 4.63, 0.46),
                 (eff_attn.entmax15, 512, 1.0, 16.4, 1.1), (eff_attn.sparsemax, 64, 1.0, 3.25, 0.26)]
        for fn, n, sigma, mean, tol in cases:
            _, info = self.tf(fn, sigma * rng.standard_normal((400, n)), return_info=True)
            assert abs(to_host(info["support_size"]).mean() - mean) <= tol, (fn.__name__, n, sigma)

    @pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
    def test_vjp_and_alpha_gradient_match_central_differences(self, alpha):
        rng = np.random.default_rng(12)
        z = rng.standard_normal((3, 6)) * 2
        g = rng.standard_normal((3, 6))
        p, info = self.tf(eff_attn.entmax_bisect, z, alpha, return_info=True)
        x = (alpha - 1) * z - to_host(info["tau"])[:, None]
        assert np.abs(x).min() > 1e-4                                           # no entry at the threshold
        fn = {1.5: eff_attn.entmax15_vjp, 2.0: eff_attn.sparsemax_vjp}.get(alpha)
        if fn is not None:
            _, vjp = self.tf(fn, z)
            expected = finite_difference_vjp(lambda a: entmax_oracle(a, alpha), [z], g)[0]
            assert_close(vjp(self.xp_in(g)), expected, rel=1e-6)
        alphas = np.array([alpha, alpha + 0.1, alpha - 0.1])
        _, vjp = self.tf(eff_attn.entmax_bisect_vjp, z, alphas)
        dz, dalpha = vjp(self.xp_in(g))
        dz_fd = finite_difference_vjp(lambda a: np.stack([entmax_oracle(a[i], alphas[i]) for i in range(3)]), [z], g)[0]
        da_fd = [np.sum(g[i] * (entmax_oracle(z[i], a + 1e-6) - entmax_oracle(z[i], a - 1e-6))) / 2e-6
                 for i, a in enumerate(alphas)]
        assert_close(dz, dz_fd, rel=1e-6)
        assert_close(dalpha, da_fd, rel=1e-6, atol=1e-8)
        assert dalpha.shape == (3,)

    def test_alpha_gradient_sums_over_rows_sharing_an_alpha(self):
        rng = np.random.default_rng(2)
        z = rng.standard_normal((2, 3, 5))
        g = rng.standard_normal((2, 3, 5))
        _, vjp = self.tf(eff_attn.entmax_bisect_vjp, z, np.array([[1.4], [1.8]]))
        _, dalpha = vjp(self.xp_in(g))
        _, vjp_rows = self.tf(eff_attn.entmax_bisect_vjp, z, np.array([[1.4] * 3, [1.8] * 3]))
        _, per_row = vjp_rows(self.xp_in(g))
        assert dalpha.shape == (2, 1)
        assert_close(dalpha[:, 0], per_row.sum(-1), rel=1e-12)
        _, vjp_scalar = self.tf(eff_attn.entmax_bisect_vjp, z[0], 1.4)
        _, d_scalar = vjp_scalar(self.xp_in(g[0]))
        assert isinstance(d_scalar, float)
        assert d_scalar == pytest.approx(per_row[0].sum(), rel=1e-12)

    def test_axis_argument_moves_the_simplex_axis(self):
        rng = np.random.default_rng(3)
        z = rng.standard_normal((4, 5, 3))
        mask = rng.random((4, 1, 3)) > 0.3
        p = to_host(self.tf(eff_attn.entmax15, z, axis=1, mask=mask))
        expected = np.moveaxis(to_host(self.tf(eff_attn.entmax15, np.moveaxis(z, 1, -1),
                                               mask=np.moveaxis(np.broadcast_to(mask, z.shape), 1, -1))), -1, 1)
        assert_close(p, expected, rel=1e-12)
        _, vjp = self.tf(eff_attn.sparsemax_vjp, z, axis=0)
        assert to_host(vjp(self.xp_in(np.ones_like(z)))).shape == z.shape

    def test_large_float32_inputs_stay_finite(self):
        rng = np.random.default_rng(5)
        z = rng.uniform(-100, 100, (4, 7 if self.small else 50))
        for fn, args, alpha in ((eff_attn.sparsemax, (), 2.0), (eff_attn.entmax15, (), 1.5),
                                (eff_attn.entmax_bisect, (1.3,), 1.3), (eff_attn.entmax_bisect, (1.0,), 1.0)):
            p32 = to_host(self.tf(fn, z.astype(np.float32), *args))
            assert p32.dtype == np.float32 and np.isfinite(p32).all()
            assert_close(p32, entmax_oracle(z.astype(np.float32), alpha), rel=1e-5)

    def test_bad_transform_input_raises_clear_errors(self):
        with pytest.raises(ValueError, match="alpha=0.5 is out of range"):
            self.tf(eff_attn.entmax_bisect, Z, 0.5)
        with pytest.raises(ValueError, match="greater than 1"):
            self.tf(eff_attn.entmax_bisect_vjp, Z, 1.0)
        with pytest.raises(ValueError, match="every alpha must be finite and at least 1"):
            self.tf(eff_attn.entmax_bisect, np.zeros((2, 3)), np.array([1.5, 0.9]))
        with pytest.raises(ValueError, match="does not broadcast"):
            self.tf(eff_attn.entmax_bisect, np.zeros((2, 3)), np.array([1.5, 1.6, 1.7]))
        with pytest.raises(eff_attn.NotSupportedError, match="float16"):
            self.tf(eff_attn.sparsemax, Z.astype(np.float16))
        with pytest.raises(TypeError, match="float32 or float64"):
            self.tf(eff_attn.sparsemax, np.arange(3))
        with pytest.raises(ValueError, match="mask of shape"):
            self.tf(eff_attn.entmax15, Z, mask=np.ones(4, bool))
        with pytest.raises(TypeError, match="boolean keep-mask"):
            self.tf(eff_attn.entmax15, Z, mask=np.ones(3))
        with pytest.raises(ValueError, match="axis=2 is out of range"):
            self.tf(eff_attn.entmax15, Z, axis=2)
        with pytest.raises(ValueError, match="NaN or inf"):
            self.tf(eff_attn.sparsemax, np.array([0.0, np.inf]))
        with pytest.raises(ValueError, match="n_iter=0 is too small"):
            self.tf(eff_attn.entmax_bisect, Z, 1.5, n_iter=0)
        _, vjp = self.tf(eff_attn.sparsemax_vjp, Z)
        with pytest.raises(ValueError, match="dp must have z's shape"):
            vjp(self.xp_in(np.ones(4)))

    # --- the spec's oracles: attention -----------------------------------------------

    @pytest.mark.parametrize("alpha, expected", [(2.0, [0.75, 1.0]), (1.5, [0.67399264, 1.0]),
                                                 (1.0, [0.64081189, 0.95138918])])
    def test_attention_hand_values(self, alpha, expected):
        q = np.array([[1.0]])
        k = np.array([[-2.0], [0.0], [0.5]])
        v = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        assert_close(self.run(q, k, v, alpha=alpha), [expected], rel=1e-8)

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_attention_equals_entmax15_of_the_scores(self, causal, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (3, 5) if self.small else (13, 21)
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=4, Dv=3, scale=2.0)
        mask = rng.random((2, Nk)) > 0.3
        visible = visible_matrix(Nq, Nk, mask, causal)
        s = 0.5 * np.einsum("gid,gjd->gij", q, k)
        expected = np.einsum("gij,gjd->gid", to_host(eff_attn.entmax15(s, mask=visible)), v)
        assert_close(self.run(q, k, v, mask=mask, causal=causal), expected, rel=1e-12)
        for alpha in (1.25, 2.0):
            assert_close(self.run(q, k, v, mask=mask, causal=causal, alpha=alpha),
                         attention_oracle(q, k, v, visible, alpha), rel=1e-10)

    def test_float32_scores_of_90_stay_finite_and_match_float64(self):
        q = np.array([[9.0], [-9.0], [3.0]])
        k = np.array([[10.0], [9.0], [-10.0], [8.0]])
        v = np.random.default_rng(0).standard_normal((4, 2))
        for alpha in (1.5, 2.0, 1.3):
            out64 = self.run(q, k, v, alpha=alpha, scale=1.0)
            out32 = to_host(self.run(*(a.astype(np.float32) for a in (q, k, v)), alpha=alpha, scale=1.0))
            assert np.isfinite(out32).all()
            assert_close(out32, out64, rel=0, atol=1e-5)
        rng = np.random.default_rng(1)
        q, k, v = random_qkv(rng, batch=(2,), Nq=4, Nk=6, D=8)
        s = 90.0 / np.abs(np.einsum("gid,gjd->gij", q, k)).max()
        out32 = to_host(self.run(*(a.astype(np.float32) for a in (q, k, v)), scale=s))
        assert np.isfinite(out32).all()
        assert_close(out32, attention_oracle(q, k, v, True, 1.5, scale=s), rel=1e-4)

    @pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0])
    @pytest.mark.parametrize("causal", [False, True])
    def test_backward_matches_central_differences(self, alpha, causal):
        rng = np.random.default_rng(21)
        q, k, v = random_qkv(rng, batch=(2,), Nq=3, Nk=5, D=3, Dv=2, scale=1.5)
        mask = np.array([[True, True, False, True, True], [True, True, True, True, False]])
        dout = rng.standard_normal((2, 3, 2))
        out, vjp, info = self.run_vjp(q, k, v, mask=mask, causal=causal, alpha=alpha, return_info=True)
        if alpha > 1:                                                           # no pair at the threshold
            s = np.einsum("gid,gjd->gij", q, k) / np.sqrt(3)
            x = (alpha - 1) * s - to_host(info["tau"])[..., None]
            assert np.abs(x[np.broadcast_to(visible_matrix(3, 5, mask, causal), x.shape)]).min() > 1e-4
        grads = vjp(self.xp_in(dout))
        visible = visible_matrix(3, 5, mask, causal)
        expected = finite_difference_vjp(lambda a, b, c: attention_oracle(a, b, c, visible, alpha), [q, k, v], dout)
        for name, g, e in zip("qkv", grads, expected):
            assert_close(g, e, rel=1e-6, what=f"d{name}")

    def test_alpha_one_is_exact_attention(self):
        q, k, v = random_qkv(3, batch=(2,), Nq=4, Nk=6, D=4)
        ref, _ = dense_attention(q, k, v, visible_matrix(4, 6, None, True))
        out, info = self.run(q, k, v, alpha=1.0, causal=True, return_info=True)
        assert_close(out, ref, rel=1e-12)
        assert info["algorithm"] == "softmax" and info["sparsity"] == 0

    def test_alpha_per_slice_runs_bisection(self):
        rng = np.random.default_rng(8)
        q, k, v = random_qkv(rng, batch=(2, 3), Nq=4, Nk=5, D=4, scale=2.0)
        alpha = np.array([1.2, 1.6, 2.4])                                      # per head, broadcast over batch
        out, info = self.run(q, k, v, alpha=alpha, return_info=True)
        assert info["algorithm"] == "bisect"
        for h, a in enumerate(alpha):
            assert_close(to_host(out)[:, h], attention_oracle(q[:, h], k[:, h], v[:, h], True, a), rel=1e-10)

    # --- agreement and properties ----------------------------------------------------

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    @pytest.mark.parametrize("alpha", [1.5, 2.0, 1.7])
    def test_agrees_with_float64_oracle(self, dtype, causal, alpha, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (3, 5) if self.small else (37, 53)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=Nq, Nk=Nk, D=8, Dv=5, scale=1.5)
        mask = rng.random((2, 1, Nk)) > 0.2
        visible = visible_matrix(Nq, Nk, mask, causal)
        ref = attention_oracle(q, k, v, visible, alpha)
        out, info = self.run(*(a.astype(dtype) for a in (q, k, v)), mask=mask, causal=causal, alpha=alpha,
                             return_info=True)
        assert to_host(out).dtype == dtype
        assert_close(out, ref, rel=self.tol(dtype) if alpha != 1.7 or dtype == np.float64 else 1e-4)
        support = (entmax_oracle(np.einsum("...id,...jd->...ij", q, k) / np.sqrt(8), alpha,
                                 np.broadcast_to(visible, (2, 2, Nq, Nk))) > 0).sum(-1)
        if dtype == np.float64:
            assert (to_host(info["support_size"]) == support).all()

    def test_property_shapes_masks_dtypes_and_large_scores(self):
        @settings(max_examples=self.examples, deadline=None)
        @given(
            Nq=st.integers(1, 9), Nk=st.integers(1, 9), D=st.integers(1, 4), Dv=st.integers(1, 3),
            lead=st.sampled_from([(), (2,), (2, 2)]), causal=st.sampled_from(CAUSAL_MODES),
            masked=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
            big=st.booleans(), alpha=st.sampled_from([1.0, 1.5, 2.0, 1.3]), seed=st.integers(0, 2**16),
        )
        def check(Nq, Nk, D, Dv, lead, causal, masked, dtype, big, alpha, seed):
            rng = np.random.default_rng(seed)
            q, k, v = random_qkv(rng, batch=lead, Nq=Nq, Nk=Nk, D=D, Dv=Dv, scale=6.0 if big else 1.0)
            mask = rng.random((*lead, Nk)) > 0.4 if masked else None
            visible = visible_matrix(Nq, Nk, mask, causal)
            ref = attention_oracle(q, k, v, visible, alpha)
            out, info = self.run(*(a.astype(dtype) for a in (q, k, v)), mask=mask, causal=causal, alpha=alpha,
                                 return_info=True)
            out = to_host(out)
            assert np.isfinite(out).all()
            empty = ~np.broadcast_to(visible, (*np.broadcast_shapes(lead, lead), Nq, Nk)).any(-1)
            assert (out[empty] == 0).all() and (to_host(info["empty_rows"]) == empty).all()
            rel = self.tol(dtype) * (10 if big else 1) * (10 if alpha == 1.3 and dtype == np.float32 else 1)
            assert_close(out, ref, rel=rel)

        check()

    def test_info_keys_sparsity_and_flops(self):
        from eff_attn.methods.entmax import flops

        q, k, v = random_qkv(0, batch=(2,), Nq=4, Nk=6, D=3, Dv=5, scale=3.0)
        out, info = self.run(q, k, v, causal=True, return_info=True)
        assert {"method", "backend", "params", "flops", "empty_rows", "algorithm", "tau", "support_size",
                "sparsity"} <= set(info)
        assert info["method"] == "entmax" and info["backend"] == self.BACKEND and info["algorithm"] == "sort"
        support = to_host(info["support_size"])
        visible = sum(min(6, i + 2 + 1) for i in range(4))                      # causal offset Nk - Nq = 2
        assert info["sparsity"] == pytest.approx(1 - support.sum(-1).mean() / visible, rel=1e-12)
        assert info["flops"] == 2 * visible * (2 * 3 + 2 * 5 + 3 + 6)
        assert flops(4, 6, 3, 5, batch=2, causal=True, backward=True) == info["flops"] + 2 * visible * (18 + 20 + 9)

    def test_bad_attention_parameters_raise_clear_errors(self):
        q, k, v = random_qkv(0)
        with pytest.raises(ValueError, match="alpha=0.9 is out of range"):
            self.run(q, k, v, alpha=0.9)
        with pytest.raises(ValueError, match="'sort' exists for alpha=1.5 and alpha=2 only"):
            self.run(q, k, v, alpha=1.3, algorithm="sort")
        with pytest.raises(ValueError, match="'softmax' is alpha=1"):
            self.run(q, k, v, alpha=2.0, algorithm="softmax")
        with pytest.raises(ValueError, match="needs alpha > 1"):
            self.run(q, k, v, alpha=1.0, algorithm="bisect")
        with pytest.raises(ValueError, match="algorithm='fast' is not one of"):
            self.run(q, k, v, algorithm="fast")
        with pytest.raises(ValueError, match="n_iter=0 is too small"):
            self.run(q, k, v, n_iter=0)
        with pytest.raises(ValueError, match="greater than 1"):
            self.run(q, k, v, alpha=np.array([1.5, 1.0]))
        with pytest.raises(ValueError, match="does not broadcast to the leading axes"):
            self.run(q, k, v, alpha=np.array([1.5, 1.6, 1.7]))
        with pytest.raises(ValueError, match="runs algorithm='bisect'"):
            self.run(q, k, v, alpha=np.array([1.5, 1.6]), algorithm="sort")


class TestEntmaxNumba(TestEntmax):
    BACKEND = "numba"

    def test_agrees_with_numpy_reference_at_n_4096_rows(self):
        rng = np.random.default_rng(0)
        z = rng.standard_normal((3, 4096)).astype(np.float32) * 4
        for alpha in (1.3, 1.5, 2.0):
            ref = eff_attn.entmax_bisect(z.astype(np.float64), alpha, backend="numpy")
            ours32 = eff_attn.entmax_bisect(z, alpha, backend="numba")
            ref32 = eff_attn.entmax_bisect(z, alpha, backend="numpy")
            # float32 bisection: error vs float64 at most 2x NumPy's, plus 1e-6
            assert np.abs(ours32 - ref).max() <= 2 * np.abs(ref32 - ref).max() + 1e-6


@pytest.mark.gpu
class TestEntmaxCupy(TestEntmaxNumba):
    BACKEND = "cupy"


@pytest.mark.cudasim
class TestEntmaxCupyEmulated(TestEntmax):
    """The CuPy code under the CUDA simulator: every test, with fewer parameter combinations."""

    BACKEND = "cupy"
    EMULATED = True

    @pytest.mark.parametrize("dtype, causal, alpha", [(np.float64, True, 1.5), (np.float32, False, 2.0),
                                                      (np.float64, "top_left", 1.7)])
    def test_agrees_with_float64_oracle(self, dtype, causal, alpha, global_random_seed):
        super().test_agrees_with_float64_oracle(dtype, causal, alpha, global_random_seed)

    @pytest.mark.parametrize("scale", [1e-3, 1e3])
    def test_sort_equals_bisect_and_support_sizes_match(self, scale, global_random_seed):
        super().test_sort_equals_bisect_and_support_sizes_match(scale, global_random_seed)

    @pytest.mark.parametrize("causal", [True])
    def test_attention_equals_entmax15_of_the_scores(self, causal, global_random_seed):
        super().test_attention_equals_entmax15_of_the_scores(causal, global_random_seed)

    @pytest.mark.parametrize("alpha, causal", [(1.25, True), (2.0, False), (1.0, True)])
    def test_backward_matches_central_differences(self, alpha, causal):
        super().test_backward_matches_central_differences(alpha, causal)

    @pytest.mark.parametrize("alpha", [1.0, 1.5, 2.5])
    def test_matches_independent_brent_oracle(self, alpha, global_random_seed):
        super().test_matches_independent_brent_oracle(alpha, global_random_seed)


def test_flops_thresholds_per_algorithm():
    from eff_attn.methods.entmax import flops

    assert flops(8, 8, 4, alpha=1.0) == 64 * (16 + 5)
    assert flops(8, 8, 4, alpha=2.0) == 64 * (16 + 3 + 6)
    assert flops(8, 8, 4, alpha=1.3, n_iter=10) == 64 * (16 + 44)
    assert flops(4, 4, 1, causal=True, alpha=1.5) == 10 * (4 + 8)


def test_transforms_and_attention_are_public():
    for name in ("sparsemax", "entmax15", "entmax_bisect", "sparsemax_vjp", "entmax15_vjp", "entmax_bisect_vjp",
                 "entmax_attention"):
        assert name in eff_attn.__all__ and callable(getattr(eff_attn, name))
    assert "entmax" in eff_attn.method_names()


def test_torch_tensors_round_trip():
    torch = pytest.importorskip("torch")
    z = torch.tensor([[-2.0, 0.0, 0.5]], dtype=torch.float64)
    p = eff_attn.sparsemax(z)
    assert isinstance(p, torch.Tensor)
    assert_close(p, [[0.0, 0.25, 0.75]], rel=1e-12)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_sort_threshold_of_long_rows_matches_bisection_for_short_and_long_supports(alpha):
    """Rows longer than SORT_CANDIDATES sort only their largest entries unless the support may not fit."""
    from eff_attn import _entmax

    rng = np.random.default_rng(3)
    supports = []
    for scale in (0.001, 0.02, 0.3, 5.0):                                   # supports above and below 256
        z = rng.standard_normal((6, 700)) * scale
        visible = rng.random((6, 700)) > 0.1
        visible[0] = False                                                  # an empty row
        p, tau, support = _entmax.entmax_rows(z, visible, alpha, algorithm="sort")
        p_bis, _, _ = _entmax.entmax_rows(z, visible, alpha, algorithm="bisect", n_iter=200)
        np.testing.assert_allclose(p, p_bis, rtol=0, atol=1e-9)
        np.testing.assert_allclose(p[1:].sum(axis=-1), 1.0, rtol=1e-12)
        assert (p[0] == 0).all()
        supports.extend(support[1:])
    assert min(supports) < _entmax.SORT_CANDIDATES < max(supports)
