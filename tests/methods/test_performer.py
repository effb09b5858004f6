"""Tests of ``performer`` (FAVOR+): the spec's oracles, statistics, backend agreement, gradients.

Expected values come from hand computation, the softmax kernel ``exp(x.y)``,
or ``favor_oracle`` below: the dense textbook formula
``out = ((A B^T) * visible) v / ((A B^T) * visible) 1`` with
``A = exp(lambda(q))``, ``B = exp(lambda(k))``, written here in float64 from
the paper's definitions, never from the code under test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eff_attn
from eff_attn.methods.performer import default_num_features, draw_performer_features
from eff_attn.metrics import rel_frobenius
from eff_attn.testing import assert_close, finite_difference_vjp, random_qkv, relative_error, to_host
from tests._harness import BackendCase
from tests._oracles import dense_attention, visible_matrix

CAUSAL_MODES = [False, True, "top_left"]


def favor_oracle(q, k, v, omega, visible, scale=None):
    """Dense FAVOR+ in float64: textbook positive features, then a masked linear-attention ratio."""
    q, k, v, omega = (np.asarray(a, dtype=np.float64) for a in (q, k, v, omega))
    s = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    qt, kt = np.sqrt(s) * q, np.sqrt(s) * k

    def phi(x):
        return np.exp(x @ np.swapaxes(omega, -1, -2) - 0.5 * (x * x).sum(-1, keepdims=True)) / np.sqrt(omega.shape[-2])

    W = np.where(visible, phi(qt) @ np.swapaxes(phi(kt), -1, -2), 0.0)       # (..., Nq, Nk)
    den = W.sum(-1, keepdims=True)
    return np.where(den > 0, (W @ v) / np.where(den > 0, den, 1.0), 0.0)


class TestPerformer(BackendCase):
    METHOD = "performer"
    BACKEND = "numpy"

    def features(self, rng, m, D):
        return rng.standard_normal((m, D))

    def assert_float32_agreement(self, q, k, v, **kw):
        """Spec: error against the float64 result at most 2x NumPy float32's, plus 1e-6."""
        ref = eff_attn.attention(q, k, v, method="performer", backend="numpy", **kw)
        np32 = eff_attn.attention(*(a.astype(np.float32) for a in (q, k, v)), method="performer",
                                  backend="numpy", **kw)
        out32 = self.run(*(a.astype(np.float32) for a in (q, k, v)), **kw)
        assert to_host(out32).dtype == np.float32
        assert relative_error(out32, ref) <= 2 * relative_error(np32, ref) + 1e-6

    # --- the spec's oracles -------------------------------------------------------

    def test_hand_value_with_one_feature(self):
        # m = 1, Omega = [[1, 0]], s = 1, q = 0: phi(k_j) ~ exp(k_j[0] - 1/2); out = e / (e + 1).
        out = self.run(np.zeros((1, 2)), np.eye(2), np.array([[1.0], [0.0]]), features=np.array([[1.0, 0.0]]),
                       scale=1.0)
        assert_close(out, [[np.e / (np.e + 1)]], rel=1e-12)

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_textbook_and_stable_forms_agree(self, causal, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (3, 5) if self.small else (11, 17)
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=4, Dv=3)
        mask = rng.random((2, Nk)) > 0.3
        kw = dict(mask=mask, causal=causal, features=self.features(rng, 7, 4), chunk_size=4)
        assert_close(self.run(q, k, v, variant="textbook", **kw), self.run(q, k, v, **kw), rel=1e-12)

    def test_outputs_lie_in_the_convex_hull_of_visible_values(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (4, 5) if self.small else (20, 30)
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=4, Dv=3, scale=2.0)
        mask = rng.random((2, Nk)) > 0.3
        for causal in CAUSAL_MODES:
            out = to_host(self.run(q, k, v, mask=mask, causal=causal, rng=global_random_seed, num_features=8))
            vis = visible_matrix(Nq, Nk, mask, causal)                     # (2, Nq, Nk)
            hi = np.where(vis[..., None], v[:, None], -np.inf).max(axis=2)  # (2, Nq, Dv)
            lo = np.where(vis[..., None], v[:, None], np.inf).min(axis=2)
            seen = vis.any(-1)
            assert np.isfinite(out).all()
            assert (out[seen] <= hi[seen] + 1e-12).all() and (out[seen] >= lo[seen] - 1e-12).all()
            assert (out[~seen] == 0).all()

    def test_masked_keys_have_no_effect_even_holding_nan(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        q, k, v = random_qkv(rng, batch=(2,), Nq=5, Nk=7, D=3, Dv=2)
        mask = rng.random((2, 7)) > 0.4
        omega = self.features(rng, 6, 3)
        kept = [np.flatnonzero(mask[g]) for g in range(2)]
        for causal in (False, True):
            k2, v2 = k.copy(), v.copy()
            k2[~mask], v2[~mask] = np.nan, np.inf
            out = to_host(self.run(q, k2, v2, mask=mask, causal=causal, features=omega))
            ref = favor_oracle(q, k, v, omega, visible_matrix(5, 7, mask, causal))
            assert_close(out, ref, rel=1e-10)
            if not causal:  # dropping the masked keys altogether gives the same rows
                for g in range(2):
                    alone = self.run(q[g], k[g, kept[g]], v[g, kept[g]], features=omega)
                    assert_close(out[g], alone, rel=1e-10)

    @pytest.mark.parametrize("causal", [True, "top_left"])
    @pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)])
    def test_causal_equals_dense_lower_triangle(self, causal, shape, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (min(shape[0], 4), min(shape[1], 5)) if self.small else shape
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=4, Dv=3)
        mask = rng.random((2, Nk)) > 0.25
        omega = self.features(rng, 5, 4)
        ref = favor_oracle(q, k, v, omega, visible_matrix(Nq, Nk, mask, causal))
        for chunk in (1, 2, 3, 64):
            assert_close(self.run(q, k, v, mask=mask, causal=causal, features=omega, chunk_size=chunk), ref,
                         rel=1e-10, what=f"chunk_size={chunk}")

    def test_stable_form_survives_large_norms_in_float32_and_eps_biases_it(self):
        rng = np.random.default_rng(9)
        Nq, Nk, D = (4, 6, 8) if self.small else (32, 48, 16)
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=D, Dv=4)
        scale = 1.0
        q *= 5 / np.linalg.norm(q, axis=-1, keepdims=True)               # |x~| = 5 (s = 1)
        k *= 5 / np.linalg.norm(k, axis=-1, keepdims=True)
        omega = draw_performer_features(3, 64, D)
        ref = favor_oracle(q, k, v, omega, True, scale=scale)
        args32 = [a.astype(np.float32) for a in (q, k, v)]
        out = self.run(*args32, features=omega, scale=scale)
        biased = self.run(*args32, features=omega, scale=scale, eps=1e-4)
        assert np.isfinite(to_host(out)).all() and np.isfinite(to_host(biased)).all()
        err, err_eps = relative_error(out, ref), relative_error(biased, ref)
        assert err < 1e-4 and err_eps > 10 * err

    def test_textbook_form_raises_on_float32_overflow(self):
        # lambda = 20 * 20 - 20^2 / 2 = 200 > log(float32 max) = 88.7; float64 (709.8) is fine.
        q = np.array([[20.0, 0.0]])
        k = np.array([[20.0, 0.0], [0.0, 1.0]])
        v = np.array([[1.0], [3.0]])
        kw = dict(features=np.array([[20.0, 0.0], [0.0, 1.0]]), scale=1.0)
        ref = self.run(q, k, v, variant="textbook", **kw)
        with pytest.raises(FloatingPointError, match="textbook"):
            self.run(*(a.astype(np.float32) for a in (q, k, v)), variant="textbook", **kw)
        assert_close(self.run(*(a.astype(np.float32) for a in (q, k, v)), **kw), ref, rel=1e-6)

    def test_underflowing_denominator_gives_zero_and_is_reported(self):
        # Query and key point in opposite directions: a = [1, e^-800], b = [e^-800, 1] -> den = 0.
        q = np.array([[40.0, 0.0], [0.0, 0.0]])
        k = np.array([[-40.0, 0.0]])
        v = np.array([[2.0]])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, info = self.run(q, k, v, features=np.array([[10.0, 0.0], [-10.0, 0.0]]), scale=1.0,
                                 return_info=True)
        assert_close(out, [[0.0], [2.0]], rel=0)
        assert to_host(info["underflow_rows"]).tolist() == [True, False]
        assert to_host(info["empty_rows"]).tolist() == [False, False]
        assert info["min_denominator"] == 0.0

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    @pytest.mark.parametrize("options", [{}, {"eps": 0.1}, {"variant": "textbook"}])
    def test_backward_matches_central_differences(self, causal, options):
        rng = np.random.default_rng(11)
        Nq, Nk = (3, 4) if self.small else (5, 7)
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=3, Dv=2)
        mask = rng.random((2, Nk)) > 0.25
        dout = rng.standard_normal((2, Nq, 2))
        omega = self.features(rng, 4, 3)
        kw = dict(mask=mask, causal=causal, features=omega, chunk_size=2, **options)
        if not options:   # eps = 0: the dense oracle is the function being differentiated
            f = lambda a, b, c: favor_oracle(a, b, c, omega, visible_matrix(Nq, Nk, mask, causal))  # noqa: E731
        else:             # eps > 0 and textbook: differentiate the NumPy forward itself
            f = lambda a, b, c: eff_attn.attention(a, b, c, method="performer", backend="numpy", **kw)  # noqa: E731
        expected = finite_difference_vjp(f, [q, k, v], dout)
        _, vjp = self.run_vjp(q, k, v, **kw)
        for name, g, e in zip("qkv", vjp(self.xp_in(dout)), expected):
            assert_close(g, e, rel=1e-6, what=f"d{name}")

    # --- randomness, parameters and info -----------------------------------------------

    def test_seeded_draws_are_reproducible_and_reported(self):
        q, k, v = random_qkv(0, batch=(2,), Nq=4, Nk=5, D=3, Dv=2)
        out, info = self.run(q, k, v, rng=7, num_features=6, return_info=True)
        assert_close(self.run(q, k, v, rng=7, num_features=6), out, rel=0)
        assert_close(info["features"], draw_performer_features(7, 6, 3), rel=0)
        assert_close(out, self.run(q, k, v, features=info["features"]), rel=0)
        fresh = [to_host(self.run(q, k, v, num_features=6)) for _ in range(2)]   # rng=None: fresh draws
        assert not np.array_equal(fresh[0], fresh[1])

    def test_per_slice_features_match_slice_by_slice_calls(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        q, k, v = random_qkv(rng, batch=(2,), Nq=4, Nk=5, D=3, Dv=2)
        omega = rng.standard_normal((2, 6, 3))
        out = to_host(self.run(q, k, v, features=omega, causal=True))
        for g in range(2):
            assert_close(out[g], self.run(q[g], k[g], v[g], features=omega[g], causal=True), rel=1e-12)

    def test_info_reports_features_denominators_and_flops(self):
        q, k, v = random_qkv(0, batch=(2,), Nq=4, Nk=6, D=3, Dv=5)
        mask = np.ones((2, 6), dtype=bool)
        mask[1] = False
        _, info = self.run(q, k, v, mask=mask, rng=1, return_info=True)
        m = default_num_features(3)
        assert info["method"] == "performer" and info["backend"] == self.BACKEND
        assert info["num_features"] == m and to_host(info["features"]).shape == (m, 3)
        assert to_host(info["empty_rows"]).tolist() == [[False] * 4, [True] * 4]
        assert not to_host(info["underflow_rows"]).any() and info["min_denominator"] > 0
        assert info["flops"] == 2 * (2 * m * 10 * (3 + 5) + 6 * m * 10)

    def test_bad_parameters_raise_clear_errors(self):
        q, k, v = random_qkv(0, D=3)
        omega = np.ones((4, 3))
        with pytest.raises(ValueError, match="pass rng=None"):
            self.run(q, k, v, features=omega, rng=0)
        with pytest.raises(ValueError, match=r"features must have shape \(\.\.\., m, D\) with D=3"):
            self.run(q, k, v, features=np.ones((4, 2)))
        with pytest.raises(ValueError, match="num_features=5 disagrees"):
            self.run(q, k, v, features=omega, num_features=5)
        with pytest.raises(ValueError, match="cannot be combined"):
            self.run(q, k, v, features=omega, orthogonal=False)
        with pytest.raises(ValueError, match="do not broadcast"):
            self.run(q, k, v, features=np.ones((3, 4, 3)))
        with pytest.raises(ValueError, match="NaN"):
            self.run(q, k, v, features=np.full((4, 3), np.nan))
        with pytest.raises(ValueError, match="eps=-0.1 is out of range"):
            self.run(q, k, v, eps=-0.1)
        with pytest.raises(ValueError, match="variant='exact' is not one of"):
            self.run(q, k, v, variant="exact")
        with pytest.raises(ValueError, match="feature_norms='unit' is not one of"):
            self.run(q, k, v, feature_norms="unit")
        with pytest.raises(ValueError, match="chunk_size=0 is too small"):
            self.run(q, k, v, chunk_size=0)
        with pytest.raises(ValueError, match="num_features=0 is too small"):
            self.run(q, k, v, num_features=0)
        with pytest.raises(ValueError, match="scale > 0"):
            self.run(q, k, v, scale=-1.0)

    # --- agreement and properties --------------------------------------------------

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_agrees_with_numpy_at_fixed_features(self, causal, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (3, 5) if self.small else (70, 150)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=Nq, Nk=Nk, D=8, Dv=5)
        mask = rng.random((2, 1, Nk)) > 0.2
        kw = dict(mask=mask, causal=causal, features=draw_performer_features(rng, 6 if self.small else 40, 8),
                  chunk_size=2 if self.small else 16)
        ref = eff_attn.attention(q, k, v, method="performer", backend="numpy", **kw)
        assert_close(self.run(q, k, v, **kw), ref, rel=1e-10)
        assert_close(ref, favor_oracle(q, k, v, kw["features"], visible_matrix(Nq, Nk, mask, causal)), rel=1e-10)
        self.assert_float32_agreement(q, k, v, **kw)

    def test_property_shapes_masks_chunks_and_dtypes(self):
        @settings(max_examples=self.examples, deadline=None)
        @given(
            Nq=st.integers(1, 9), Nk=st.integers(1, 9), D=st.integers(1, 4), Dv=st.integers(1, 3),
            m=st.integers(1, 6), lead=st.sampled_from([(), (1,), (2,), (2, 3)]),
            causal=st.sampled_from(CAUSAL_MODES), masked=st.booleans(), big=st.booleans(),
            dtype=st.sampled_from([np.float32, np.float64]), chunk=st.sampled_from([1, 2, 3, 64]),
            seed=st.integers(0, 2**16),
        )
        def check(Nq, Nk, D, Dv, m, lead, causal, masked, big, dtype, chunk, seed):
            rng = np.random.default_rng(seed)
            q, k, v = random_qkv(rng, batch=lead, Nq=Nq, Nk=Nk, D=D, Dv=Dv, scale=3.0 if big else 1.0)
            mask = rng.random((*lead, Nk)) > 0.4 if masked else None
            omega = rng.standard_normal((m, D))
            kw = dict(mask=mask, causal=causal, features=omega, chunk_size=chunk)
            ref = favor_oracle(q, k, v, omega, visible_matrix(Nq, Nk, mask, causal))
            out = self.run(q.astype(dtype), k.astype(dtype), v.astype(dtype), **kw)
            assert np.isfinite(to_host(out)).all()
            if dtype == np.float64:
                assert_close(out, ref, rel=1e-9)
            elif self.BACKEND == "numpy":
                assert_close(out, ref, rel=1e-4)
            else:
                self.assert_float32_agreement(q, k, v, **kw)

        check()


class TestPerformerNumba(TestPerformer):
    BACKEND = "numba"


@pytest.mark.gpu
class TestPerformerCupy(TestPerformer):
    BACKEND = "cupy"


@pytest.mark.cudasim
class TestPerformerCupyEmulated(TestPerformer):
    BACKEND = "cupy"
    EMULATED = True


# --- statistics of the estimator (backend-independent: the backends agree at fixed features) ---


@pytest.mark.parametrize("orthogonal", [False, True])
def test_kernel_estimate_is_unbiased(orthogonal):
    """Mean of phi(x).phi(y) over 4000 draws (m = 16, D = 4) is within 4 standard errors of exp(x.y)."""
    from eff_attn.methods.performer.reference import query_features

    rng = np.random.default_rng(2024)
    draws, m, D = 4000, 16, 4
    omega = draw_performer_features(rng, m, D, orthogonal=orthogonal, feature_norms="chi", lead_shape=(draws,))
    for _ in range(3):
        x, y = rng.standard_normal((2, D))
        x, y = x * rng.uniform(0.2, 1) / np.linalg.norm(x), y * rng.uniform(0.2, 1) / np.linalg.norm(y)
        pair = np.broadcast_to(np.stack([x, y]), (draws, 2, D))           # |x~|, |y~| <= 1 (s = 1)
        phi, _ = query_features(pair, omega, 1.0, variant="textbook", eps=0.0, ratio=1 / np.sqrt(m))
        estimates = (phi[:, 0] * phi[:, 1]).sum(-1)                        # (draws,)
        stderr = estimates.std(ddof=1) / np.sqrt(draws)
        assert abs(estimates.mean() - np.exp(x @ y)) <= 4 * stderr


def test_orthogonal_features_are_orthogonal_blocks_with_gaussian_norms():
    D, m, draws = 8, 20, 500
    omega = draw_performer_features(0, m, D, lead_shape=(draws,))             # (draws, m, D)
    units = omega / np.linalg.norm(omega, axis=-1, keepdims=True)
    for start in range(0, m, D):
        block = units[:, start : start + D]                                   # (draws, <=D, D)
        gram = block @ np.swapaxes(block, -1, -2)
        assert_close(gram, np.broadcast_to(np.eye(block.shape[1]), gram.shape), rel=0, atol=1e-12)
    sq = (omega**2).sum(-1).ravel()                                           # chi^2_D: mean D, variance 2D
    assert abs(sq.mean() - D) <= 4 * np.sqrt(2 * D / sq.size)
    fixed = draw_performer_features(0, m, D, feature_norms="sqrt_d")
    assert_close(np.linalg.norm(fixed, axis=-1), np.full(m, np.sqrt(D)), rel=1e-12)
    # The sign fix makes each block Haar: a row's first direction cosine has mean 0 (without it, one sign).
    first = units[:, 0, 0]
    assert abs(first.mean()) <= 4 * np.sqrt(1 / D / draws)
    assert (first > 0).mean() > 0.4 and (first < 0).mean() > 0.4


def _clustered_heads():
    from eff_attn.bench.problems import clustered

    # Unit-norm scaled inputs (|x~| ~ 1, logits of order 1): the regime where FAVOR+'s variance,
    # which grows like exp(|q~ + k~|^2), lets the error fall as 1/sqrt(m) (docs/methods/performer.md).
    return clustered(128, d=64, heads=4, strength=1.0, seed=3)


def _real_heads():
    from eff_attn.bench.problems import real_heads

    return real_heads(n=128, max_heads=8)


def _have_real_heads() -> bool:
    from importlib import resources

    return resources.files("eff_attn.bench").joinpath("data", "real_heads.npz").is_file()


@pytest.mark.parametrize("problem", [
    _clustered_heads,
    pytest.param(_real_heads, marks=pytest.mark.skipif(not _have_real_heads(), reason="real_heads.npz not shipped")),
])
def test_error_falls_as_features_grow(problem):
    """Mean rel. error over 8 seeds strictly decreases for m = 32, 128, 512; at 512 it is at most half of 32's.

    The halving holds where the scaled inputs have norm about 1 (clustered). On the
    shipped real heads the scaled norms are 3.5-4, the estimator's variance grows like
    exp(|q~ + k~|^2), and the error only creeps down (measured 1.10, 0.98, 0.92; still
    0.84 at m = 8192): there the test asks for the strict decrease alone, and
    docs/methods/performer.md reports the numbers.
    """
    p = problem()
    exact, _ = dense_attention(p.q, p.k, p.v, True)
    errors = []
    for m in (32, 128, 512):
        runs = [rel_frobenius(eff_attn.attention(p.q, p.k, p.v, method="performer", backend="numpy",
                                                 num_features=m, rng=1000 + seed), exact).mean()
                for seed in range(8)]
        errors.append(np.mean(runs))
    assert errors[0] > errors[1] > errors[2]
    if problem is _clustered_heads:
        assert errors[2] <= 0.5 * errors[0]


def test_flops_follow_the_spec_formula():
    from eff_attn.methods.performer import flops

    m, Nq, Nk, D, Dv, C = 10, 6, 8, 4, 3, 2
    forward = 2 * m * (Nq + Nk) * (D + Dv) + 6 * m * (Nq + Nk)
    assert flops(Nq, Nk, D, Dv, num_features=m) == forward
    assert flops(Nq, Nk, D, Dv, num_features=m, causal=True, chunk_size=C) == forward + 2 * Nq * C * (m + Dv)
    assert flops(Nq, Nk, D, Dv, num_features=m, batch=3) == 3 * forward
    assert flops(64, 64, 64) == 2 * 266 * 128 * 128 + 6 * 266 * 128
    assert flops(Nq, Nk, D, Dv, num_features=m, backward=True) > 2 * forward


def test_default_features_and_budgets():
    from eff_attn.methods.performer import METHOD

    assert default_num_features(64) == 266 and default_num_features(1) == 1
    sweep = [b["num_features"] for b in METHOD.budgets]
    assert METHOD.budget_name == "num_features" and sweep == sorted(sweep) and 3 <= len(sweep) <= 5
