"""Tests of ``yoso``: the spec's oracles, backend agreement, statistics, gradients, errors.

Expected values come from hand computation, the closed form of the SimHash
collision law, or the independent float64 oracles written at the top of this
module from the spec's formulas (hashing by einsum, the dense collision
matrix, YOSO-E by angles), never from the code under test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eff_attn
from eff_attn.methods import yoso
from eff_attn.methods.yoso import draw_yoso_hyperplanes
from eff_attn.testing import assert_close, finite_difference_vjp, random_qkv, to_host

# --------------------------------------------------------------------------------------
# Independent float64 oracles
# --------------------------------------------------------------------------------------


def f64(x):
    return np.asarray(x, dtype=np.float64)


def oracle_codes(x, R):
    """``sum_b 2**b [R_hb . x > 0]`` by einsum, (..., N, m)."""
    proj = np.einsum("...nd,...mtd->...nmt", np.asarray(x, dtype=np.float64), np.asarray(R, dtype=np.float64))
    return ((proj > 0) * (2 ** np.arange(R.shape[-2]))).sum(-1)


def oracle_collisions(qc, kc, mask=None):
    """Dense ``C_ij = mu_j mean_h [qc_ih = kc_jh]``."""
    C = (np.asarray(qc)[..., :, None, :] == np.asarray(kc)[..., None, :, :]).mean(-1)
    return C if mask is None else C * np.asarray(mask)[..., None, :]


def oracle_unit(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def oracle_expectation_weights(q, k, tau, c=1.0, mask=None):
    """``(1 - theta/pi)^tau`` with ``theta = arccos(clip(c cos))``, float64."""
    cos = np.einsum("...id,...jd->...ij", oracle_unit(f64(q)), oracle_unit(f64(k)))
    theta = np.arccos(np.clip(c * cos, -1, 1))
    P = (1 - theta / np.pi) ** tau
    return P if mask is None else P * np.asarray(mask)[..., None, :]


def oracle_output(A, v, normalize=True, mask=None):
    v = f64(v) if mask is None else np.where(np.asarray(mask)[..., None], f64(v), 0.0)
    u = A @ v
    return oracle_unit(u) if normalize else u


def masked_v(v, mask):
    return v if mask is None else np.where(np.asarray(mask)[..., None], v, 0.0)


def hand_codes_setup():
    R = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    q = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, -2.0], [-1.0, -1.0]])
    k = np.array([[2.0, 1.0], [1.0, -1.0], [0.5, 3.0], [-1.0, 2.0]])
    v = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]])
    return R, q, k, v


def stacked_hyperplanes(seeds, m, tau, D):
    """One independent draw per seed, stacked on a leading axis (len(seeds), m, tau, D)."""
    return np.stack([draw_yoso_hyperplanes(s, m, tau, D) for s in seeds])


from tests._harness import BackendCase  # noqa: E402


class TestYoso(BackendCase):
    METHOD = "yoso"
    BACKEND = "numpy"

    def tol(self, dtype):
        return 1e-10 if dtype == np.float64 else 1e-5

    # --- the spec's hand oracles ---------------------------------------------------

    def test_sampled_hand_example(self):
        R, q, k, v = hand_codes_setup()
        y, info = self.run(q, k, v, hyperplanes=R, return_info=True)
        assert to_host(info["q_codes"]).ravel().tolist() == [3, 2, 1, 0]   # row 1 is a tie: bit 0
        assert to_host(info["k_codes"]).ravel().tolist() == [3, 1, 3, 2]
        assert_close(y, [[0.89442719, 0.44721360], [0.94868330, -0.31622777], [0, 1], [0, 0]], rel=1e-8)
        assert to_host(info["empty_rows"]).tolist() == [False, False, False, True]
        u = self.run(q, k, v, hyperplanes=R, normalize_output=False)
        assert_close(u, [[2, 1], [3, -1], [0, 1], [0, 0]], rel=0)
        mask = np.array([True, True, False, True])
        u = self.run(q, k, v, hyperplanes=R, normalize_output=False, mask=mask)
        assert_close(u[0], [1, 0], rel=0)

    def test_expectation_hand_values(self):
        y = self.run(np.array([[1.0, 0.0]]), np.eye(2), np.eye(2), variant="expectation", tau=2)
        assert_close(y, [[0.97014250, 0.24253563]], rel=1e-8)               # P = [1, 1/4]
        # 60 degrees at tau = 3: P = (2/3)^3 = 8/27; antipodal: 0
        k = np.array([[0.5, np.sqrt(3) / 2], [-1.0, 0.0]])
        u, info = self.run(np.array([[1.0, 0.0]]), k, np.eye(2), variant="expectation", tau=3,
                           normalize_output=False, return_info=True)
        assert_close(u, [[8 / 27, 0.0]], rel=1e-12)
        assert to_host(u)[0, 1] == 0.0                                          # exactly 0, not a rounding residue
        assert_close(info["row_mass"], [8 / 27], rel=1e-12)
        # damping 0.98 with q = k, tau = 8: (1 - arccos(0.98)/pi)^8
        x = np.array([[0.3, -1.2, 0.7]])
        u = self.run(x, x, np.ones((1, 1)), variant="expectation", tau=8, damping=0.98, normalize_output=False)
        assert_close(u, [[0.59029046]], rel=1e-7)

    @pytest.mark.parametrize("variant", ["sampled", "expectation"])
    def test_tau_zero_gives_normalised_sum_of_kept_values(self, variant):
        q, k, v = random_qkv(3, batch=(2,), Nq=3, Nk=5, D=4, Dv=3)
        mask = np.array([[True, False, True, True, False], [False, True, True, True, True]])
        kw = {"rng": 0, "num_hashes": 3} if variant == "sampled" else {}
        y = self.run(q, k, v, mask=mask, variant=variant, tau=0, **kw)
        total = masked_v(v, mask).sum(axis=1, keepdims=True)                 # (2, 1, 3)
        assert_close(y, np.broadcast_to(oracle_unit(total), (2, 3, 3)), rel=1e-12)

    # --- codes and the collision identity -------------------------------------------

    def test_codes_match_independent_hashing(self, global_random_seed):
        q, k, v = random_qkv(global_random_seed, batch=(2, 2), Nq=5, Nk=7, D=6, Dv=3)
        _, info = self.run(q, k, v, rng=global_random_seed, num_hashes=4, tau=5, return_info=True)
        R = info["hyperplanes"]
        assert R.shape == (2, 2, 4, 5, 6)
        assert np.array_equal(to_host(info["q_codes"]), oracle_codes(q, R))
        assert np.array_equal(to_host(info["k_codes"]), oracle_codes(k, R))
        assert np.array_equal(to_host(info["q_codes"]), yoso.yoso_codes(q, R))

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_sampled_output_equals_collision_matrix_times_v(self, dtype, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (4, 6) if self.small else (37, 53)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=Nq, Nk=Nk, D=8, Dv=5)
        mask = rng.random((2, 1, Nk)) > 0.3
        cast = [a.astype(dtype) for a in (q, k, v)]
        u, info = self.run(*cast, mask=mask, rng=global_random_seed, num_hashes=3 if self.small else 11, tau=4,
                           normalize_output=False, return_info=True)
        C = oracle_collisions(to_host(info["q_codes"]), to_host(info["k_codes"]), mask)
        assert to_host(u).dtype == dtype
        assert_close(u, oracle_output(C, cast[2], normalize=False, mask=mask), rel=self.tol(dtype))
        assert_close(info["row_mass"], C.sum(-1), rel=1e-12)

    @pytest.mark.parametrize("m", [1, 2, 4, 32])
    def test_integer_values_give_bitwise_equal_output(self, m):
        rng = np.random.default_rng(m)
        N, tau = (6, 3) if self.small else (512, 12)
        m = min(m, 4) if self.small else m
        q, k, _ = random_qkv(rng, batch=(2,), Nq=N, Nk=N, D=16, dtype=np.float32)
        v = rng.integers(-8, 9, size=(2, N, 8)).astype(np.float32)
        mask = rng.random((2, N)) > 0.2
        u, info = self.run(q, k, v, mask=mask, rng=m, num_hashes=m, tau=tau, normalize_output=False,
                           return_info=True)
        C = oracle_collisions(to_host(info["q_codes"]), to_host(info["k_codes"]), mask)
        expected = (C @ masked_v(v.astype(np.float64), mask)).astype(np.float32)  # exact: dyadic, small
        assert np.array_equal(to_host(u), expected)

    @pytest.mark.parametrize("damping", [1.0, 0.98, 0.5])
    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_expectation_matches_independent_float64_formula(self, damping, dtype, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (3, 5) if self.small else (45, 300)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=Nq, Nk=Nk, D=16, Dv=5)
        mask = rng.random((2, 2, Nk)) > 0.25
        P = oracle_expectation_weights(q, k, 6, damping, mask)
        y, info = self.run(*(a.astype(dtype) for a in (q, k, v)), mask=mask, variant="expectation", tau=6,
                           damping=damping, return_info=True)
        assert_close(y, oracle_output(P, v, mask=mask), rel=self.tol(dtype))
        assert_close(info["row_mass"], P.sum(-1), rel=self.tol(dtype))

    # --- statistics of the sampler ----------------------------------------------------

    def test_collision_law_holds_within_binomial_error(self):
        D, tau, m = 16, 3, (300 if self.small else 20000)   # the simulator runs one block per (hash, key)
        angles = np.array([0, np.pi / 3, np.pi / 2, 2 * np.pi / 3, np.pi])
        q = np.zeros((1, D))
        q[0, 0] = 1.0
        k = np.zeros((5, D))
        k[:, 0], k[:, 1] = np.cos(angles), np.sin(angles)
        k[-1] = -q[0]                                                           # exactly antipodal
        expected = (1 - angles / np.pi) ** tau                                  # 1, 8/27, 1/8, 1/27, 0
        assert_close(expected, [1, 0.2962963, 0.125, 0.0370370, 0], rel=1e-7)
        for seed in range(2 if self.small else 5):
            u = to_host(self.run(q, 2.5 * k, np.eye(5), rng=seed, num_hashes=m, tau=tau,
                                 normalize_output=False))[0]                   # u_0j = C_0j
            sigma = np.sqrt(expected * (1 - expected) / m)
            assert (np.abs(u - expected) <= 4.5 * sigma).all(), (seed, u, expected)
            assert u[0] == 1.0 and u[-1] == 0.0

    def test_hadamard_collisions_fall_somewhat_below_the_law(self):
        if self.small:
            pytest.skip("thousands of hashes: too slow under the CUDA simulator")
        D, tau, m = 16, 3, 20000
        angles = np.array([0, np.pi / 3, np.pi / 2, 2 * np.pi / 3, np.pi])
        rng = np.random.default_rng(4)                      # a generic plane: the rotations mix dense vectors
        a = rng.standard_normal(D)
        a /= np.linalg.norm(a)
        w = rng.standard_normal(D)
        w -= (w @ a) * a
        w /= np.linalg.norm(w)
        k = np.cos(angles)[:, None] * a + np.sin(angles)[:, None] * w
        expected = (1 - angles / np.pi) ** tau
        u = to_host(self.run(a[None], k, np.eye(5), rng=1, num_hashes=m, tau=tau, hash_family="hadamard",
                             normalize_output=False))[0]
        assert (np.abs(u - expected) <= 0.35 * expected + 0.005).all(), (u, expected)
        assert (np.diff(u) < 0).all() and u[0] == 1.0 and u[-1] == 0.0

    def _seeded_batch(self, m, seeds):
        """The spec's problem (N = 6, D = 8, Dv = 3, tau = 2), one slice per seed with that seed's hashes."""
        q, k, v = random_qkv(5, batch=(), Nq=6, Nk=6, D=8, Dv=3)
        big = [np.broadcast_to(a, (len(seeds), *a.shape)) for a in (q, k, v)]
        return (q, k, v), big, stacked_hyperplanes(seeds, m, 2, 8)

    def test_mean_over_seeds_converges_to_expectation(self):
        if self.small:
            pytest.skip("4000 seeds: statistics of the host draw, checked on the host backends")
        seeds = range(10000, 14000)
        (q, k, v), big, R = self._seeded_batch(4, seeds)
        u = to_host(self.run(*big, hyperplanes=R, normalize_output=False))   # (4000, 6, 3)
        uE = oracle_expectation_weights(q, k, 2) @ v                          # (6, 3)
        se = u.std(axis=0, ddof=1) / np.sqrt(len(seeds))
        z = np.abs(u.mean(axis=0) - uE) / se
        assert z.max() < 5.0, z.max()                                         # prototype: 1.8

    def test_error_falls_like_inverse_sqrt_of_hashes(self):
        if self.small:
            pytest.skip("4000 seeds: statistics of the host draw, checked on the host backends")
        seeds = range(10000, 14000)
        rms = {}
        for m in (4, 64):
            (q, k, v), big, R = self._seeded_batch(m, seeds)
            u = to_host(self.run(*big, hyperplanes=R, normalize_output=False))
            uE = oracle_expectation_weights(q, k, 2) @ v
            rms[m] = np.sqrt(((u - uE) ** 2).mean())
        assert 3.0 <= rms[4] / rms[64] <= 5.5, rms                             # theory: sqrt(16) = 4

    def test_budget_sweep_error_decreases(self):
        if self.small:
            pytest.skip("covered by the host backends; the budgets only change num_hashes")
        budgets = yoso.METHOD.budgets
        assert [b["num_hashes"] for b in budgets] == [8, 16, 32, 64] and yoso.METHOD.budget_name == "num_hashes"
        q, k, v = random_qkv(2, batch=(64,), Nq=16, Nk=16, D=8, Dv=4)
        uE = oracle_expectation_weights(q, k, 4) @ v
        errors = [np.sqrt(((to_host(self.run(q, k, v, rng=9, tau=4, normalize_output=False, **b)) - uE) ** 2).mean())
                  for b in budgets]
        assert all(a > b for a, b in zip(errors, errors[1:])), errors

    # --- invariances and masks ---------------------------------------------------------

    def test_positive_rescaling_and_value_scaling_invariance(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        q, k, v = random_qkv(rng, batch=(2,), Nq=5, Nk=6, D=4, Dv=3)
        a = rng.uniform(0.1, 10, size=(2, 5, 1))
        b = rng.uniform(0.1, 10, size=(2, 6, 1))
        kw = {"rng": 7, "num_hashes": 5, "tau": 3}
        y, info = self.run(q, k, v, return_info=True, **kw)
        y2, info2 = self.run(a * q, b * k, v, return_info=True, **kw)
        assert np.array_equal(to_host(info["q_codes"]), to_host(info2["q_codes"]))
        assert np.array_equal(to_host(info["k_codes"]), to_host(info2["k_codes"]))
        assert np.array_equal(to_host(y), to_host(y2))
        assert_close(self.run(q, k, 3.5 * v, **kw), y, rel=1e-12)             # v -> alpha v
        e = self.run(q, k, v, variant="expectation", tau=3)
        assert_close(self.run(a * q, b * k, v, variant="expectation", tau=3), e, rel=1e-12)

    @pytest.mark.parametrize("variant", ["sampled", "expectation"])
    def test_joint_key_permutation_is_invariant(self, variant, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        q, k, v = random_qkv(rng, batch=(2,), Nq=4, Nk=7, D=4, Dv=3)
        mask = rng.random((2, 7)) > 0.3
        perm = rng.permutation(7)
        kw = {"rng": 3, "num_hashes": 4, "tau": 3} if variant == "sampled" else {"tau": 3}
        out = self.run(q, k, v, mask=mask, variant=variant, **kw)
        out2 = self.run(q, k[:, perm], v[:, perm], mask=mask[:, perm], variant=variant, **kw)
        assert_close(out2, out, rel=1e-12)

    @pytest.mark.parametrize("variant", ["sampled", "expectation"])
    def test_nan_and_inf_in_masked_rows_are_ignored(self, variant):
        q, k, v = random_qkv(4, batch=(2,), Nq=3, Nk=5, D=4, Dv=3)
        mask = np.array([[True, False, True, True, False], [True, True, False, True, True]])
        k2, v2 = k.copy(), v.copy()
        k2[0, 1], v2[0, 4], k2[1, 2], v2[1, 2] = np.nan, np.inf, -np.inf, np.nan
        kw = {"rng": 1, "num_hashes": 4, "tau": 2} if variant == "sampled" else {"tau": 2}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            clean = self.run(q, k, v, mask=mask, variant=variant, **kw)
            dirty = self.run(q, k2, v2, mask=mask, variant=variant, **kw)
        assert np.array_equal(to_host(clean), to_host(dirty))

    @pytest.mark.parametrize("variant", ["sampled", "expectation"])
    def test_all_false_mask_gives_zero_output_and_gradient(self, variant):
        q, k, v = random_qkv(2, batch=(2,), Nq=3, Nk=4, D=3, Dv=2)
        mask = np.zeros((2, 4), dtype=bool)
        mask[1, 2] = True
        kw = {"rng": 0, "num_hashes": 4, "tau": 2} if variant == "sampled" else {"tau": 2}
        out, vjp, info = self.run_vjp(q, k, v, mask=mask, variant=variant, return_info=True, **kw)
        assert (to_host(out)[0] == 0).all()
        assert to_host(info["empty_rows"])[0].all()
        dq, dk, dv = (to_host(g) for g in vjp(self.xp_in(np.ones((2, 3, 2)))))
        assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
        assert (dk[1, [0, 1, 3]] == 0).all() and (dv[1, [0, 1, 3]] == 0).all()

    # --- gradients ------------------------------------------------------------------------

    def test_adjoint_identity_of_dv(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        q, k, v = random_qkv(rng, batch=(2,), Nq=5, Nk=6, D=4, Dv=3)
        mask = rng.random((2, 6)) > 0.3
        du = rng.standard_normal((2, 5, 3))
        u, vjp = self.run_vjp(q, k, v, mask=mask, rng=2, num_hashes=6, tau=2, normalize_output=False)
        _, _, dv = vjp(self.xp_in(du))
        assert_close(np.sum(to_host(dv) * masked_v(v, mask)), np.sum(du * to_host(u)), rel=1e-12)

    @pytest.mark.parametrize("damping", [1.0, 0.98])
    def test_expectation_exact_grad_matches_central_differences(self, damping):
        rng = np.random.default_rng(11)
        while True:                                                            # keep |cos| <= 0.95
            q, k, v = random_qkv(rng, batch=(2,), Nq=4, Nk=5, D=3, Dv=2)
            if np.abs(np.einsum("gid,gjd->gij", oracle_unit(q), oracle_unit(k))).max() <= 0.95:
                break
        mask = np.array([[True, True, False, True, True], [True, True, True, True, False]])
        dout = rng.standard_normal((2, 4, 2))
        _, vjp = self.run_vjp(q, k, v, mask=mask, variant="expectation", tau=3, damping=damping, grad="exact")
        grads = vjp(self.xp_in(dout))
        expected = finite_difference_vjp(
            lambda a, b, c: oracle_output(oracle_expectation_weights(a, b, 3, damping, mask), c, mask=mask),
            [q, k, v], dout,
        )
        for name, g, e in zip("qkv", grads, expected):
            assert_close(g, e, rel=1e-6, what=f"d{name}")

    def test_exact_to_surrogate_ratio_is_the_closed_form(self):
        theta = np.array([0.2, 0.7, 1.1, np.pi / 2, 2.0, 2.7])
        tau = 4
        ratios = []
        for t in theta:
            q = np.array([[1.0, 0.0]])
            k = np.array([[np.cos(t), np.sin(t)]])
            grads = {}
            for grad in ("exact", "surrogate"):
                _, vjp = self.run_vjp(q, k, np.ones((1, 1)), variant="expectation", tau=tau, grad=grad,
                                      normalize_output=False)
                grads[grad] = to_host(vjp(self.xp_in(np.ones((1, 1))))[0])
            ratios.append(grads["exact"][0, 1] / grads["surrogate"][0, 1])
        ratios = np.array(ratios)
        assert_close(ratios, 2 / ((np.pi - theta) * np.sin(theta)), rel=1e-9)
        assert (ratios >= 1.099).all()
        assert_close(ratios[3], 4 / np.pi, rel=1e-12)

    @pytest.mark.parametrize("normalize_output", [True, False])
    def test_sampled_surrogate_equals_dense_formula(self, normalize_output, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk, m, tau = (4, 5, 3, 2) if self.small else (9, 11, 6, 2)
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=4, Dv=3)
        mask = rng.random((2, Nk)) > 0.3
        codes = (rng.integers(0, 2**tau, size=(2, Nq, m)), rng.integers(0, 2**tau, size=(2, Nk, m)))
        dy = rng.standard_normal((2, Nq, 3))
        y, vjp = self.run_vjp(q, k, v, mask=mask, codes=codes, tau=tau, normalize_output=normalize_output)
        dq, dk, dv = vjp(self.xp_in(dy))
        # the spec's section 5, written out densely
        C = oracle_collisions(*codes, mask)
        u = C @ masked_v(v, mask)
        un = np.linalg.norm(u, axis=-1, keepdims=True)
        yy = u / np.maximum(un, 1e-12)
        du = np.where(un > 1e-12, (dy - (dy * yy).sum(-1, keepdims=True) * yy) / np.where(un > 0, un, 1), 0) \
            if normalize_output else dy
        qh, kh = oracle_unit(q), oracle_unit(k)
        dx = (du @ masked_v(v, mask).transpose(0, 2, 1)) * (tau / 2) * C
        dqh, dkh = dx @ kh, dx.transpose(0, 2, 1) @ qh

        def through_norm(d, xh, x):
            return (d - (d * xh).sum(-1, keepdims=True) * xh) / np.linalg.norm(x, axis=-1, keepdims=True)

        assert_close(y, yy if normalize_output else u, rel=1e-10)
        assert_close(dq, through_norm(dqh, qh, q), rel=1e-10, what="dq")
        assert_close(dk, masked_v(through_norm(dkh, kh, k), mask), rel=1e-10, what="dk")
        assert_close(dv, masked_v(C.transpose(0, 2, 1) @ du, mask), rel=1e-10, what="dv")

    def test_sampled_dv_matches_finite_differences(self):
        rng = np.random.default_rng(8)
        q, k, v = random_qkv(rng, batch=(2,), Nq=4, Nk=5, D=3, Dv=2)
        codes = (rng.integers(0, 4, size=(2, 4, 3)), rng.integers(0, 4, size=(2, 5, 3)))
        dout = rng.standard_normal((2, 4, 2))
        _, vjp = self.run_vjp(q, k, v, codes=codes, tau=2)
        _, _, dv = vjp(self.xp_in(dout))
        C = oracle_collisions(*codes)
        (expected,) = finite_difference_vjp(lambda c: oracle_output(C, c), [v], dout)
        assert_close(dv, expected, rel=1e-7)

    def test_mean_lsh_gradient_converges_to_expectation_surrogate(self):
        if self.small:
            pytest.skip("4000 seeds: statistics of the host draw, checked on the host backends")
        seeds = range(20000, 24000)
        (q, k, v), big, R = self._seeded_batch(4, seeds)
        du = np.random.default_rng(6).standard_normal((6, 3))
        _, vjp = self.run_vjp(*big, hyperplanes=R, normalize_output=False)
        dq, dk, dv = (to_host(g) for g in vjp(self.xp_in(np.broadcast_to(du, (len(seeds), 6, 3)).copy())))
        _, vjpE = self.run_vjp(q, k, v, variant="expectation", tau=2, normalize_output=False)
        expected = [to_host(g) for g in vjpE(self.xp_in(du))]
        for name, g, e in zip("qkv", (dq, dk, dv), expected):
            se = g.std(axis=0, ddof=1) / np.sqrt(len(seeds))
            z = np.abs(g.mean(axis=0) - e) / se
            assert z.max() < 5.0, (name, z.max())                              # prototype: 1.3

    def test_expectation_surrogate_option_uses_P(self):
        rng = np.random.default_rng(4)
        q, k, v = random_qkv(rng, batch=(2,), Nq=4, Nk=5, D=3, Dv=2)
        dy = rng.standard_normal((2, 4, 2))
        y, vjp = self.run_vjp(q, k, v, rng=0, num_hashes=4, tau=3, grad="expectation_surrogate",
                              normalize_output=False)
        dq, dk, dv = vjp(self.xp_in(dy))
        P = oracle_expectation_weights(q, k, 3)
        dx = (dy @ v.transpose(0, 2, 1)) * 1.5 * P
        qh, kh = oracle_unit(q), oracle_unit(k)
        dqh = dx @ kh
        dq_expected = (dqh - (dqh * qh).sum(-1, keepdims=True) * qh) / np.linalg.norm(q, axis=-1, keepdims=True)
        assert_close(dq, dq_expected, rel=1e-10)
        assert_close(dv, P.transpose(0, 2, 1) @ dy, rel=1e-10)

    @pytest.mark.parametrize("variant", ["sampled", "expectation"])
    def test_degenerate_inputs_give_finite_outputs_and_gradients(self, variant):
        rng = np.random.default_rng(0)
        base = rng.standard_normal((4, 3))
        q = np.concatenate([base, -base, np.zeros((1, 3))])                   # q = k, q = -k, a zero vector
        k = np.concatenate([base, base, base[:1]])                             # with a duplicate key
        v = rng.standard_normal((9, 2))
        kw = {"rng": 0, "num_hashes": 4, "tau": 3} if variant == "sampled" else {"tau": 3}
        grads = ["surrogate"] if variant == "sampled" else ["surrogate", "exact"]
        for dtype in (np.float32, np.float64):
            for grad in grads:
                out, vjp = self.run_vjp(q.astype(dtype), k.astype(dtype), v.astype(dtype), variant=variant,
                                        grad=grad, **kw)
                assert np.isfinite(to_host(out)).all()
                for g in vjp(self.xp_in(np.ones((9, 2), dtype=dtype))):
                    assert np.isfinite(to_host(g)).all()

    def test_gradients_sum_over_broadcast_axes(self):
        rng = np.random.default_rng(5)
        q = rng.standard_normal((2, 3, 4, 3))
        k = rng.standard_normal((1, 5, 3))
        v = rng.standard_normal((3, 5, 2))
        dout = rng.standard_normal((2, 3, 4, 2))
        _, vjp = self.run_vjp(q, k, v, variant="expectation", tau=2, grad="exact")
        dq, dk, dv = vjp(self.xp_in(dout))
        assert to_host(dk).shape == (1, 5, 3) and to_host(dv).shape == (3, 5, 2)
        kb, vb = np.broadcast_to(k, (2, 3, 5, 3)), np.broadcast_to(v, (2, 3, 5, 2))
        expected = finite_difference_vjp(
            lambda a, b, c: oracle_output(oracle_expectation_weights(a, np.broadcast_to(b, kb.shape), 2),
                                          np.broadcast_to(c, vb.shape)),
            [q, k, v], dout,
        )
        for name, g, e in zip("qkv", (dq, dk, dv), expected):
            assert_close(g, e, rel=1e-6, what=f"d{name}")

    # --- properties ---------------------------------------------------------------------

    def test_property_shapes_masks_tau_and_dtypes(self):
        @settings(max_examples=self.examples, deadline=None)
        @given(
            Nq=st.integers(1, 9), Nk=st.integers(1, 9), D=st.integers(1, 5), Dv=st.integers(1, 4),
            lead=st.sampled_from([(), (1,), (2,), (2, 3)]), masked=st.booleans(),
            dtype=st.sampled_from([np.float32, np.float64]), tau=st.integers(1, 16), m=st.integers(1, 5),
            big=st.booleans(), seed=st.integers(0, 2**16),
        )
        def check(Nq, Nk, D, Dv, lead, masked, dtype, tau, m, big, seed):
            rng = np.random.default_rng(seed)
            q, k, v = random_qkv(rng, batch=lead, Nq=Nq, Nk=Nk, D=D, Dv=Dv, scale=1e3 if big else 1.0)
            q, k, v = (a.astype(dtype) for a in (q, k, v))
            mask = rng.random((*lead, Nk)) > 0.4 if masked else None
            m = min(m, 2) if self.small else m
            y, info = self.run(q, k, v, mask=mask, rng=seed, num_hashes=m, tau=tau, return_info=True)
            R = info["hyperplanes"]
            qc, kc = to_host(info["q_codes"]), to_host(info["k_codes"])
            assert np.array_equal(qc, oracle_codes(q, R))
            assert np.array_equal(kc, oracle_codes(masked_v(k, mask), R))
            C = oracle_collisions(qc, kc, mask)
            expected = oracle_output(C, v, mask=mask)
            assert to_host(y).dtype == dtype and np.isfinite(to_host(y)).all()
            assert_close(y, expected, rel=self.tol(dtype))
            assert np.array_equal(to_host(info["empty_rows"]), C.sum(-1) == 0)
            # YOSO-E against the float64 formula; float32 near |x| = 1 loses sqrt(eps) in the angle
            e = self.run(q, k, v, mask=mask, variant="expectation", tau=tau)
            P = oracle_expectation_weights(q, k, tau, 1.0, mask)
            cos = np.abs(np.einsum("...id,...jd->...ij", oracle_unit(f64(q)), oracle_unit(f64(k))))
            rel = self.tol(dtype) if dtype == np.float64 or cos.max() <= 0.99 else 1e-2
            assert np.isfinite(to_host(e)).all()
            assert_close(e, oracle_output(P, v, mask=mask), rel=rel, atol=rel)

        check()

    def test_agrees_with_numpy_reference_at_the_same_seed(self, numpy_reference):
        rng = np.random.default_rng(21)
        Nq, Nk = (4, 5) if self.small else (70, 300)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=Nq, Nk=Nk, D=8, Dv=6)
        mask = rng.random((2, 2, Nk)) > 0.2
        for dtype in (np.float32, np.float64):
            args = [a.astype(dtype) for a in (q, k, v)]
            for kw in ({"rng": 4, "num_hashes": 3 if self.small else 20, "tau": 5},
                       {"variant": "expectation", "tau": 5, "grad": "exact"}):
                ref_out, ref_vjp, ref_info = numpy_reference.run_vjp(*args, mask=mask, return_info=True, **kw)
                out, vjp, info = self.run_vjp(*args, mask=mask, return_info=True, **kw)
                assert_close(out, ref_out, rel=self.tol(dtype))
                if "rng" in kw:
                    assert np.array_equal(to_host(info["q_codes"]), ref_info["q_codes"])
                    assert np.array_equal(to_host(info["k_codes"]), ref_info["k_codes"])
                dy = rng.standard_normal(ref_out.shape).astype(dtype)
                for name, g, e in zip("qkv", vjp(self.xp_in(dy)), ref_vjp(dy)):
                    assert_close(g, e, rel=self.tol(dtype) * 10, what=f"d{name} {kw}")

    def test_hash_dtype_input_codes_and_replay(self):
        q, k, v = random_qkv(6, batch=(2,), Nq=5, Nk=6, D=4, Dv=3, dtype=np.float32)
        y, info = self.run(q, k, v, rng=3, num_hashes=4, tau=3, hash_dtype="input", return_info=True)
        codes = (to_host(info["q_codes"]), to_host(info["k_codes"]))
        replay = self.run(q, k, v, codes=codes, tau=3)
        assert np.array_equal(to_host(replay), to_host(y))

    def test_rng_none_draws_fresh_and_seeds_reproduce(self):
        q, k, v = random_qkv(1, batch=(2,), Nq=6, Nk=6, D=4, Dv=3)
        a, b = self.run(q, k, v, rng=5), self.run(q, k, v, rng=5)
        assert np.array_equal(to_host(a), to_host(b))
        draws = [to_host(self.run(q, k, v, num_hashes=2, tau=4)) for _ in range(4)]
        assert any(not np.array_equal(draws[0], d) for d in draws[1:])

    def test_info_has_the_spec_keys_and_flops(self):
        rng = np.random.default_rng(0)
        q, k, v = random_qkv(rng, batch=(2,), Nq=6, Nk=7, D=3, Dv=5)
        mask = rng.random((2, 7)) > 0.3
        m, tau = 4, 2
        _, info = self.run(q, k, v, mask=mask, rng=1, num_hashes=m, tau=tau, return_info=True)
        base = {"method", "backend", "params", "flops", "empty_rows"}
        spec = {"row_mass", "out_norm", "empty_row_fraction", "collision_rate", "q_codes", "k_codes", "hyperplanes",
                "table_rows", "max_bucket", "occupied_buckets", "mean_bucket_occupancy", "pairs",
                "flops_with_backward"}
        assert base | spec <= set(info)
        assert info["method"] == "yoso" and info["backend"] == self.BACKEND
        assert info["flops"] == yoso.flops(6, 7, 3, 5, batch=2, num_hashes=m, tau=tau)
        assert info["flops"] == 2 * ((6 + 7) * (2 * m * tau * 3 + m * tau + m * 5) + 4 * 6 * 5)
        qc, kc = to_host(info["q_codes"]), to_host(info["k_codes"])
        C = oracle_collisions(qc, kc, mask)
        assert info["pairs"] == int(round(m * C.sum()))
        assert info["table_rows"] == 4
        hist = np.array([[np.bincount(kc[g, mask[g], h], minlength=4) for h in range(m)] for g in range(2)])
        assert info["max_bucket"] == hist.max()
        assert np.array_equal(to_host(info["occupied_buckets"]), (hist > 0).sum(-1))
        assert_close(info["out_norm"], np.linalg.norm(C @ masked_v(v, mask), axis=-1), rel=1e-12)
        assert info["empty_row_fraction"] == (C.sum(-1) == 0).mean()
        _, info = self.run(q, k, v, variant="expectation", tau=3, return_info=True)
        assert info["flops"] == yoso.flops(6, 7, 3, 5, batch=2, variant="expectation", tau=3)
        assert {"row_mass", "out_norm", "empty_row_fraction", "collision_rate"} <= set(info)

    # --- bad input ---------------------------------------------------------------------

    @pytest.mark.parametrize("kwargs, error, match", [
        ({"tau": 31}, ValueError, "tau=31 is too large.*int32"),
        ({"tau": 21}, ValueError, "tau=21 is too large; it must be at most 20"),
        ({"tau": -1}, ValueError, "tau=-1 is too small"),
        ({"num_hashes": 0}, ValueError, "num_hashes=0 is too small"),
        ({"causal": True}, eff_attn.NotSupportedError, "yoso defines no causal form"),
        ({"scale": 0.3}, eff_attn.NotSupportedError, "no score scale"),
        ({"damping": 0.0, "variant": "expectation"}, ValueError, "damping=0.0 is out of range"),
        ({"damping": 1.5, "variant": "expectation"}, ValueError, "damping=1.5 is out of range"),
        ({"damping": 0.98}, eff_attn.NotSupportedError, "sampled' needs damping=1"),
        ({"grad": "exact"}, eff_attn.NotSupportedError, "grad='exact' is not defined for variant='sampled'"),
        ({"grad": "nope"}, ValueError, "grad='nope' is not one of"),
        ({"variant": "expectation", "num_hashes": 4}, ValueError, "num_hashes only apply to variant='sampled'"),
        ({"variant": "expectation", "grad": "expectation_surrogate"}, ValueError, "is for variant='sampled'"),
        ({"variant": "fast"}, ValueError, "variant='fast' is not one of"),
        ({"hash_family": "sparse"}, ValueError, "hash_family='sparse' is not one of"),
        ({"hash_dtype": "float32"}, ValueError, "hash_dtype='float32' is not one of"),
        ({"hyperplanes": np.ones((2, 3, 4)), "rng": 0}, ValueError, "cannot be combined with rng"),
        ({"hyperplanes": np.ones((2, 3, 5))}, ValueError, r"hyperplanes must have shape \(\.\.\., \*, \*, 4\)"),
        ({"hyperplanes": np.ones((2, 3, 4)), "tau": 2}, ValueError, "tau=2 disagrees with hyperplanes"),
        ({"codes": (np.zeros((3, 2), int), np.zeros((5, 2), int))}, ValueError, "needs an explicit tau"),
        ({"codes": (np.zeros((3, 2), int), np.full((5, 2), 4)), "tau": 2}, ValueError, r"k_codes must lie in \[0, 2\*\*tau\) = \[0, 4\)"),
        ({"codes": (np.zeros((3, 2), int), np.zeros((5, 2), int)), "tau": 2, "rng": 1}, ValueError,
         "cannot be combined with rng"),
        ({"codes": (np.zeros((3, 2), int), np.zeros((5, 3), int)), "tau": 2}, ValueError, "same number m"),
        ({"codes": (np.zeros((3, 2), int), np.zeros((5, 2), int)), "tau": 2, "hyperplanes": np.ones((2, 2, 4))},
         ValueError, "cannot be combined with hyperplanes"),
        ({"normalize_output": 1}, TypeError, "normalize_output must be True or False"),
        ({"block": 3}, TypeError, "has no parameter 'block'"),
    ])
    def test_bad_input_raises_a_clear_error(self, kwargs, error, match):
        q, k, v = random_qkv(0, batch=(), Nq=3, Nk=5, D=4, Dv=2)
        with pytest.raises(error, match=match):
            self.run(q, k, v, **kwargs)

    def test_public_function_refuses_any_scale(self):
        q, k, v = random_qkv(0, batch=(), Nq=3, Nk=5, D=4, Dv=2)
        with pytest.raises(eff_attn.NotSupportedError, match="no score scale"):
            eff_attn.yoso_attention(q, k, v, backend=self.BACKEND, scale=0.5)  # even the default 1/sqrt(D)

    def test_half_precision_is_refused(self):
        q, k, v = random_qkv(0, batch=(), Nq=3, Nk=5, D=4, Dv=2, dtype=np.float16)
        with pytest.raises(eff_attn.NotSupportedError, match="float16"):
            self.run(q, k, v)


class TestYosoNumba(TestYoso):
    BACKEND = "numba"

    def test_result_does_not_depend_on_thread_count(self):
        import numba

        q, k, v = random_qkv(3, batch=(3,), Nq=60, Nk=70, D=8, Dv=5)
        before = numba.get_num_threads()
        outs = []
        try:
            for threads in sorted({1, before}):
                numba.set_num_threads(threads)
                out, vjp = self.run_vjp(q, k, v, rng=2, num_hashes=20, tau=3)
                outs.append([to_host(out), *(to_host(g) for g in vjp(np.ones_like(to_host(out))))])
        finally:
            numba.set_num_threads(before)
        for a, b in zip(outs[0], outs[-1]):
            assert np.array_equal(a, b)

    def test_outer_and_pair_bucket_forms_agree(self):
        # tau = 1 puts many queries and keys in each bucket, so the outer form is chosen;
        # the dense reference computes the pair sums.
        q, k, v = random_qkv(9, batch=(2,), Nq=40, Nk=50, D=3, Dv=2)
        dy = np.random.default_rng(1).standard_normal((2, 40, 2))
        for backend in ("numpy", "numba"):
            _, vjp = eff_attn.attention_vjp(q, k, v, method="yoso", backend=backend, rng=1, num_hashes=9, tau=1)
            grads = vjp(dy)
            if backend == "numpy":
                expected = grads
        for name, g, e in zip("qkv", grads, expected):
            assert_close(g, e, rel=1e-10, what=f"d{name}")


@pytest.mark.gpu
class TestYosoCupy(TestYoso):
    BACKEND = "cupy"


@pytest.mark.cudasim
class TestYosoCupyEmulated(TestYoso):
    BACKEND = "cupy"
    EMULATED = True


# --------------------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gaussian", "hadamard"])
def test_draws_nest_hash_major(family):
    big = draw_yoso_hyperplanes(3, 12, 5, 16, lead_shape=(2, 3), family=family)
    small = draw_yoso_hyperplanes(3, 7, 5, 16, lead_shape=(2, 3), family=family)
    assert big.shape == (2, 3, 12, 5, 16) and big.dtype == np.float64
    assert np.array_equal(big[..., :7, :, :], small)


def test_gaussian_draws_are_independent_across_slices():
    R = draw_yoso_hyperplanes(0, 64, 4, 8, lead_shape=(2,))
    assert not np.array_equal(R[0], R[1])
    assert abs(R.mean()) < 0.05 and abs(R.std() - 1) < 0.05


def test_hadamard_rows_are_orthogonal_within_a_rotation():
    D, tau = 16, 4
    R = draw_yoso_hyperplanes(1, 4, tau, D, family="hadamard")               # one 16 x 16 rotation
    M = R.reshape(16, 16)
    assert_close(M @ M.T, 16**3 * np.eye(16), rel=1e-12)                       # (H D)^3 with H H^T = 16 I


def test_default_tau_is_clipped_log2():
    assert [yoso.default_tau(n) for n in (1, 2, 3, 512, 513, 4000, 2**20)] == [1, 1, 2, 9, 10, 12, 16]


def test_collision_helpers_on_hand_values():
    R, q, k, v = hand_codes_setup()
    qc, kc = yoso.yoso_codes(q, R), yoso.yoso_codes(k, R)
    assert qc.ravel().tolist() == [3, 2, 1, 0] and kc.ravel().tolist() == [3, 1, 3, 2]
    C = yoso.empirical_collision_matrix(qc, kc, mask=np.array([True, True, False, True]))
    assert_close(C, [[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], rel=0)
    P = yoso.collision_probability(np.array([[1.0, 0.0]]), np.array([[0.5, np.sqrt(3) / 2], [-1, 0], [2, 0]]), 3)
    assert_close(P, [[8 / 27, 0, 1]], rel=1e-12)


def test_flops_formulas_and_crossover():
    f = yoso.flops
    assert f(10, 20, 8, 4, num_hashes=3, tau=5) == 30 * (2 * 3 * 5 * 8 + 15 + 12) + 4 * 10 * 4
    assert f(10, 20, 8, 4, variant="expectation", tau=5) == 200 * (16 + 8 + 5) + 90 * 8 + 120
    assert f(10, 20, 8, 4, variant="expectation", backward=True, grad="exact", tau=5) == \
        f(10, 20, 8, 4, variant="expectation", tau=5) + 200 * (48 + 16 + 7) + 800
    fwd = f(10, 20, 8, 4, num_hashes=3, tau=5)
    assert f(10, 20, 8, 4, num_hashes=3, tau=5, backward=True, pairs=7) == fwd + 3 * 30 * 4 + 2 * 7 * 20
    assert f(10, 20, 8, 4, num_hashes=3, tau=5, backward=True) == round(fwd + 360 + 2 * (3 * 200 / 32) * 20)
    assert f(8, 8, 4, batch=3, tau=2, num_hashes=2) == 3 * f(8, 8, 4, tau=2, num_hashes=2)
    with pytest.raises(eff_attn.NotSupportedError, match="no causal form"):
        f(8, 8, 4, causal=True)
    # the spec's FLOP crossover with exact softmax: about 300, 400 and 530 at tau = 9, 12, 16
    for tau, n_star in ((9, 300), (12, 400), (16, 530)):
        n = next(n for n in range(16, 2000) if f(n, n, 64, num_hashes=32, tau=tau) < n * n * (4 * 64 + 5))
        assert abs(n - n_star) / n_star < 0.05, (tau, n)


def test_exact_and_default_are_registered():
    assert "yoso" in eff_attn.method_names()
    assert eff_attn.yoso_attention is yoso.yoso_attention
