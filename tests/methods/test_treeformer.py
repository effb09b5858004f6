"""Tests of ``treeformer_tf`` and ``treeformer_tc``: the spec's oracles, backends, gradients, fitting.

Expected values come from hand computation, an explicit per-point tree walk
and per-query loops written here (``naive_leaves``, ``tc_loop``), scipy's
logsumexp (``tests._oracles.dense_attention``) or finite differences, never
from the code under test. Cross-backend comparisons route dyadic inputs
through dyadic trees, so every split score ``z`` is exact and never 0 in
float32 and float64 alike (spec section 8.13).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

import eff_attn
from eff_attn.methods import treeformer as tfm
from eff_attn.methods.treeformer import TreeformerState
from eff_attn.metrics import rel_frobenius
from eff_attn.testing import assert_close, finite_difference_vjp, random_qkv, relative_error, to_host
from tests._harness import BackendCase
from tests._oracles import dense_attention, visible_matrix

CAUSAL_MODES = [False, True, "top_left"]
HAND_Q = np.array([[1.0, 1.0], [-1.0, 0.0], [0.0, 7.0]])
HAND_K = np.array([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0]])
HAND_V = np.array([[1.0], [2.0], [4.0]])
HAND_TREE = TreeformerState(np.array([[1.0, 0.0]]), np.array([0.0]), 1)
HAND_MASK = np.array([True, False, True])


# --- independent oracles ----------------------------------------------------------------------


def naive_leaf(x, w, b, height):
    """The heap walk for one point, one node at a time."""
    m = 0
    for _ in range(height):
        z = float(np.dot(w[m], x)) + float(b[m])
        m = 2 * m + 1 + (1 if z < 0 else 0)
    return m - (2**height - 1)


def naive_leaves(x, tree, mask=None):
    """Leaves (..., N) of every point of x (..., N, D), the tree broadcast over the leading axes."""
    lead = x.shape[:-2] if mask is None else np.broadcast_shapes(x.shape[:-2], mask.shape[:-1])
    lead = np.broadcast_shapes(lead, tree.tree_shape)
    x = np.broadcast_to(x, (*lead, *x.shape[-2:]))
    w = np.broadcast_to(tree.w, (*lead, *tree.w.shape[-2:]))
    b = np.broadcast_to(tree.b, (*lead, tree.b.shape[-1]))
    out = np.empty(x.shape[:-1], dtype=np.int64)
    for idx in np.ndindex(*lead):
        for n in range(x.shape[-2]):
            out[idx + (n,)] = naive_leaf(x[idx + (n,)], w[idx], b[idx], tree.height)
    if mask is not None:
        out = np.where(np.broadcast_to(mask, out.shape), out, -1)
    return out


def tf_oracle(q, k, v, tree, mask=None, causal=False, scale=None):
    """Exact attention with the additive mask log M, M from the naive walk (float64)."""
    leaf_q = naive_leaves(q, tree)
    leaf_k = naive_leaves(k, tree, mask)
    same = (leaf_q[..., :, None] == leaf_k[..., None, :]) & (leaf_k >= 0)[..., None, :]
    visible = same & visible_matrix(q.shape[-2], k.shape[-2], mask, causal)
    return dense_attention(q, k, v, visible, scale)[0], visible


def tc_loop(q, k, v, tree, mask=None, scale=None):
    """TC by explicit loops: each query's path nodes, their member keys' means, a logsumexp softmax."""
    h = tree.height
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    leaf_q, leaf_k = naive_leaves(q, tree), naive_leaves(k, tree, mask)
    lead = leaf_q.shape[:-1]
    k = np.broadcast_to(k, (*lead, *k.shape[-2:]))
    v = np.broadcast_to(v, (*lead, *v.shape[-2:]))
    q = np.broadcast_to(q, (*lead, *q.shape[-2:]))
    out = np.zeros((*lead, q.shape[-2], v.shape[-1]))
    for idx in np.ndindex(*lead):
        for i in range(q.shape[-2]):
            scores, values = [], []
            for t in range(h + 1):
                members = [j for j in range(k.shape[-2])
                           if leaf_k[idx + (j,)] >= 0 and leaf_k[idx + (j,)] >> (h - t) == leaf_q[idx + (i,)] >> (h - t)]
                if members:
                    scores.append(scale * q[idx + (i,)] @ k[idx][members].mean(axis=0))
                    values.append(v[idx][members].mean(axis=0))
            if scores:
                weights = np.exp(np.array(scores) - logsumexp(scores))
                out[idx + (i,)] = weights @ np.array(values)
    return out


def dyadic_tree(rng, height, D, tree_shape=()):
    """w in {-3..3}, b in 1/8 + Z/4: with q, k in Z/4, z is exact and never 0."""
    internal = 2**height - 1
    w = rng.integers(-3, 4, size=(*tree_shape, internal, D)).astype(np.float64)
    b = 0.125 + rng.integers(-8, 8, size=(*tree_shape, internal)) / 4
    return TreeformerState(w, b, height)


def dyadic_qkv(rng, lead, Nq, Nk, D, Dv, big=False):
    q = rng.integers(-16, 17, size=(*lead, Nq, D)) / 4
    k = rng.integers(-16, 17, size=(*lead, Nk, D)) / 4
    v = rng.standard_normal((*lead, Nk, Dv))
    if big:  # 6 x Z/4 = 3/2 Z stays inside Z/4: routing is still exact
        q, k = 6 * q, 6 * k
    return q, k, v


def min_path_margin(x, tree):
    """Smallest |z| / (|w| |x| + |b|) along the paths of the points x (..., N, D)."""
    w = np.broadcast_to(tree.w, (*x.shape[:-2], *tree.w.shape[-2:]))
    b = np.broadcast_to(tree.b, (*x.shape[:-2], tree.b.shape[-1]))
    worst = np.inf
    for idx in np.ndindex(*x.shape[:-2]):
        for p in x[idx]:
            m = 0
            for _ in range(tree.height):
                z = w[idx][m] @ p + b[idx][m]
                worst = min(worst, abs(z) / (np.linalg.norm(w[idx][m]) * np.linalg.norm(p) + abs(b[idx][m])))
                m = 2 * m + 1 + (z < 0)
    return worst


def random_tree_with_margin(rng, q, k, height, margin):
    """A random unit tree centred on the data, redrawn until every path has relative |z| > margin."""
    for _ in range(200):
        tree = tfm.init_tree(q.shape[-1], height, rng=rng)
        tree = TreeformerState(tree.w, tree.b + rng.uniform(-0.3, 0.3, tree.b.shape), height)
        if min(min_path_margin(q, tree), min_path_margin(k, tree)) > margin:
            return tree
    raise AssertionError("no tree with the requested margin")


def empty_tree(D):
    return TreeformerState(np.zeros((0, D)), np.zeros(0), 0)


# --- the per-backend classes ------------------------------------------------------------------


class _TreeCase(BackendCase):
    """Tests that hold for both methods; ``METHOD`` picks TF or TC."""

    METHOD = "treeformer_tf"

    def tol(self, dtype):
        return 1e-10 if dtype == np.float64 else 1e-5

    @property
    def is_tf(self):
        return self.METHOD == "treeformer_tf"

    def oracle(self, q, k, v, tree, mask=None, causal=False, scale=None):
        if self.is_tf:
            return tf_oracle(q, k, v, tree, mask, causal, scale)[0]
        return tc_loop(q, k, v, tree, mask, scale)

    def causal_modes(self):
        return CAUSAL_MODES if self.is_tf else [False]

    def sizes(self, small, large):
        return small if self.small else large

    # --- oracles -------------------------------------------------------------------------

    def test_degenerate_tree_sends_everything_to_leaf_zero(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk, h = self.sizes((4, 5, 2), (9, 11, 3))
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=3, Dv=2)
        tree = TreeformerState(np.zeros((2**h - 1, 3)), np.ones(2**h - 1), h)
        mask = rng.random((2, Nk)) > 0.3
        mask[:, 0] = True
        out, info = self.run(q, k, v, state=tree, mask=mask, return_info=True)
        assert (to_host(info["leaf_q"]) == 0).all()
        assert set(np.unique(to_host(info["leaf_k"]))) <= {0, -1}
        if self.is_tf:
            expected = dense_attention(q, k, v, visible_matrix(Nq, Nk, mask, False))[0]
        else:
            expected = np.broadcast_to((v * mask[..., None]).sum(1, keepdims=True) / mask.sum(1)[:, None, None],
                                       (2, Nq, 2))
        assert_close(out, expected, rel=1e-12)

    def test_every_key_lands_in_exactly_one_leaf(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk, h = self.sizes((3, 8, 2), (17, 40, 3))
        q, k, v = dyadic_qkv(rng, (2,), Nq, Nk, 4, 2)
        tree = dyadic_tree(rng, h, 4)
        mask = rng.random((2, Nk)) > 0.25
        _, info = self.run(q, k, v, state=tree, mask=mask, return_info=True)
        leaf_k = to_host(info["leaf_k"])
        assert (leaf_k == naive_leaves(k, tree, mask)).all()
        assert ((leaf_k >= 0) & (leaf_k < 2**h) == mask).all()             # one leaf each, -1 iff masked
        counts = to_host(info["leaf_counts_k"])
        assert (counts.sum(-1) == mask.sum(-1)).all()
        assert (counts == np.stack([np.bincount(leaf_k[g][mask[g]], minlength=2**h) for g in range(2)])).all()
        assert (to_host(info["leaf_counts_q"]).sum(-1) == Nq).all()

    def test_hand_example_leaves_and_flops(self):
        _, info = self.run(HAND_Q, HAND_K, HAND_V, state=HAND_TREE, scale=1.0, return_info=True)
        assert to_host(info["leaf_q"]).tolist() == [0, 1, 0]                # query 3 has z = 0: ties go left
        assert to_host(info["leaf_k"]).tolist() == [0, 1, 0]
        assert info["flops"] == (79 if self.is_tf else 111) and info["flops_exact"] == 99
        _, info = self.run(HAND_Q, HAND_K, HAND_V, state=HAND_TREE, scale=1.0, mask=HAND_MASK, return_info=True)
        assert to_host(info["leaf_k"]).tolist() == [0, -1, 0]
        assert info["flops"] == (64 if self.is_tf else 93) and info["flops_exact"] == 66

    def test_scaling_the_tree_gives_bit_identical_outputs(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = self.sizes((4, 6), (20, 30))
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=4, Dv=3)
        tree = tfm.init_tree(4, 2, rng=rng, q=q, k=k)
        out = to_host(self.run(q, k, v, state=tree))
        for lam in (0.5, 2.0, 4.0):
            scaled = TreeformerState(lam * tree.w, lam * tree.b, tree.height)
            assert np.array_equal(to_host(self.run(q, k, v, state=scaled)), out)

    def test_outputs_are_convex_combinations_of_values(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = self.sizes((5, 7), (30, 50))
        q, k, v = dyadic_qkv(rng, (2,), Nq, Nk, 3, 2)
        mask = rng.random((2, Nk)) > 0.3
        mask[:, 0] = True
        out, info = self.run(q, k, v, state=dyadic_tree(rng, 2, 3), mask=mask, return_info=True)
        out, empty = to_host(out), to_host(info["empty_rows"])
        for g in range(2):
            lo, hi = v[g][mask[g]].min(axis=0), v[g][mask[g]].max(axis=0)
            rows = out[g][~empty[g]]
            assert (rows >= lo - 1e-12).all() and (rows <= hi + 1e-12).all()
            assert (out[g][empty[g]] == 0).all()

    def test_joint_key_permutation_is_invariant_and_query_permutation_permutes(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = self.sizes((5, 6), (21, 33))
        q, k, v = dyadic_qkv(rng, (2,), Nq, Nk, 3, 2)
        mask = rng.random((2, Nk)) > 0.3
        tree = dyadic_tree(rng, 2, 3)
        out = to_host(self.run(q, k, v, state=tree, mask=mask))
        perm = rng.permutation(Nk)
        assert_close(self.run(q, k[:, perm], v[:, perm], mask=mask[:, perm], state=tree), out, rel=1e-12)
        rows = rng.permutation(Nq)
        assert_close(self.run(q[:, rows], k, v, mask=mask, state=tree), out[:, rows], rel=1e-12)

    def test_fully_masked_rows_give_zero_without_warnings(self):
        rng = np.random.default_rng(3)
        q, k, v = dyadic_qkv(rng, (2,), 4, 6, 3, 2)
        mask = np.zeros((2, 6), dtype=bool)
        mask[1, 2] = True
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, info = self.run(q, k, v, state=dyadic_tree(rng, 2, 3), mask=mask, return_info=True)
        out, empty = to_host(out), to_host(info["empty_rows"])
        assert (out[0] == 0).all() and empty[0].all()
        if not self.is_tf:                                                  # TC: the root always holds key 2
            assert_close(out[1], np.broadcast_to(v[1, 2], (4, 2)), rel=1e-12)
            assert not empty[1].any()

    # --- agreement -------------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_dyadic_inputs_match_the_loop_oracle_and_route_identically(self, dtype, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk, h = self.sizes((4, 7, 2), (37, 53, 3))
        q, k, v = dyadic_qkv(rng, (2, 3), Nq, Nk, 5, 4)
        tree = dyadic_tree(rng, h, 5, tree_shape=(3,))
        mask = rng.random((2, 1, Nk)) > 0.2
        for causal in self.causal_modes():
            out, info = self.run(*(a.astype(dtype) for a in (q, k, v)), state=tree, mask=mask, causal=causal,
                                 return_info=True)
            assert to_host(out).dtype == dtype
            assert (to_host(info["leaf_q"]) == naive_leaves(q, tree)).all()
            assert (to_host(info["leaf_k"]) == naive_leaves(k, tree, mask)).all()
            assert_close(out, self.oracle(q, k, v, tree, mask, causal), rel=self.tol(dtype))

    def test_random_inputs_agree_with_numpy_when_paths_have_margin(self, global_random_seed, numpy_reference):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = self.sizes((5, 6), (40, 60))
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=4, Dv=3)
        tree = random_tree_with_margin(rng, q, k, 2, 1e-4)
        ref, ref_info = numpy_reference.run(q, k, v, state=tree, return_info=True)
        for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-5)):
            out, info = self.run(*(a.astype(dtype) for a in (q, k, v)), state=tree, return_info=True)
            assert (to_host(info["leaf_q"]) == ref_info["leaf_q"]).all()
            assert_close(out, ref, rel=tol)

    def test_property_shapes_masks_and_dtypes(self):
        @settings(max_examples=self.examples, deadline=None)
        @given(
            Nq=st.integers(1, 9), Nk=st.integers(1, 9), D=st.integers(1, 5), Dv=st.integers(1, 4),
            h=st.integers(0, 2 if self.small else 3), lead=st.sampled_from([(), (1,), (2,), (2, 3)]),
            per_head=st.booleans(), causal=st.sampled_from(self.causal_modes()), masked=st.booleans(),
            dtype=st.sampled_from([np.float32, np.float64]), big=st.booleans(), seed=st.integers(0, 2**16),
        )
        def check(Nq, Nk, D, Dv, h, lead, per_head, causal, masked, dtype, big, seed):
            rng = np.random.default_rng(seed)
            q, k, v = dyadic_qkv(rng, lead, Nq, Nk, D, Dv, big=big)
            tree = dyadic_tree(rng, h, D, tree_shape=lead[-1:] if per_head else ())
            mask = rng.random((*lead, Nk)) > 0.4 if masked else None
            out, info = self.run(*(a.astype(dtype) for a in (q, k, v)), state=tree, mask=mask, causal=causal,
                                 return_info=True)
            out = to_host(out)
            assert out.shape == (*lead, Nq, Dv) and np.isfinite(out).all()
            assert_close(out, self.oracle(q, k, v, tree, mask, causal), rel=self.tol(dtype) * (10 if big else 1))
            assert (out[to_host(info["empty_rows"])] == 0).all()

        check()

    # --- gradients --------------------------------------------------------------------------

    def test_backward_matches_central_differences(self):
        rng = np.random.default_rng(11)
        Nq, Nk = self.sizes((3, 5), (6, 9))
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=3, Dv=2)
        tree = random_tree_with_margin(rng, q, k, 2, 1e-3)
        mask = rng.random((2, Nk)) > 0.2
        dout = rng.standard_normal((2, Nq, 2))
        for causal in self.causal_modes():
            _, vjp = self.run_vjp(q, k, v, state=tree, mask=mask, causal=causal)
            grads = vjp(self.xp_in(dout))
            expected = finite_difference_vjp(
                lambda a, b, c: eff_attn.attention(a, b, c, method=self.METHOD, backend="numpy", state=tree,
                                                   mask=mask, causal=causal), [q, k, v], dout)
            for name, g, e in zip("qkv", grads, expected):
                assert_close(g, e, rel=1e-7, atol=1e-7, what=f"d{name} (causal={causal})")

    def test_backward_agrees_with_numpy_on_a_dyadic_tree(self, global_random_seed):
        """float64 to 1e-10; float32 to 1e-5 relative plus twice the NumPy float32 error (both against
        float64): small gradients such as ``dq`` lose digits to the cancellation in ``P (dP - delta)``.
        An absolute floor (1e-12, 1e-6) covers gradients that are exactly 0 but for rounding (a query
        alone with one key has ``dq = 0``)."""
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk, h = self.sizes((4, 6, 2), (30, 45, 3))
        q, k, v = dyadic_qkv(rng, (2,), Nq, Nk, 4, 3)
        tree = dyadic_tree(rng, h, 4)
        mask = rng.random((2, Nk)) > 0.2
        dout = rng.standard_normal((2, Nq, 3))

        def grads(backend, dtype, causal):
            arrays = [a.astype(dtype) for a in (q, k, v)]
            if backend == self.BACKEND:
                _, vjp = self.run_vjp(*arrays, state=tree, mask=mask, causal=causal)
                return [to_host(g) for g in vjp(self.xp_in(dout.astype(dtype)))]
            _, vjp = eff_attn.attention_vjp(*arrays, method=self.METHOD, backend=backend, state=tree, mask=mask,
                                            causal=causal)
            return vjp(dout.astype(dtype))

        for causal in self.causal_modes():
            expected = grads("numpy", np.float64, causal)
            numpy32 = grads("numpy", np.float32, causal)
            for name, g64, g32, e, n32 in zip("qkv", grads(self.BACKEND, np.float64, causal),
                                              grads(self.BACKEND, np.float32, causal), expected, numpy32):
                assert_close(g64, e, rel=1e-10, atol=1e-12, what=f"d{name} (float64, causal={causal})")
                assert_close(g32, e, rel=1e-5 + 2 * relative_error(n32, e), atol=1e-6, what=f"d{name} (float32)")

    # --- parameters, state and errors ---------------------------------------------------------

    def test_state_none_builds_a_tree_and_says_how(self):
        rng = np.random.default_rng(4)
        Nq, Nk = self.sizes((6, 8), (40, 64))
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=4, Dv=2)
        _, info = self.run(q, k, v, height=2, return_info=True)
        assert info["state_source"] == "pca_median" and info["height"] == 2
        assert info["state"].tree_shape == (2,)
        expected = tfm.init_tree_pca(q, k, 2)
        assert np.array_equal(info["state"].w, expected.w) and np.array_equal(info["state"].b, expected.b)
        _, a = self.run(q, k, v, height=2, tree_init="random", rng=7, return_info=True)
        _, b = self.run(q, k, v, height=2, tree_init="random", rng=7, return_info=True)
        assert a["state_source"] == "random" and np.array_equal(a["state"].w, b["state"].w)
        assert np.array_equal(a["state"].w, tfm.init_tree(4, 2, tree_shape=(2,), rng=7).w)

    def test_tree_init_fit_trains_the_tree_on_the_inputs(self):
        from eff_attn.bench.problems import clustered

        problem = clustered(64, d=8, heads=2, clusters=4, seed=1)
        q, k, v = problem.q, problem.k, problem.v
        exact = dense_attention(q, k, v, True)[0]
        out_pca = self.run(q, k, v, height=3)
        out_fit, info = self.run(q, k, v, height=3, tree_init="fit", return_info=True)
        assert info["state_source"] == "fit" and len(info["fit_history"].loss) == tfm.FIT_STEPS + 1
        assert rel_frobenius(out_fit, exact).sum() < rel_frobenius(out_pca, exact).sum()
        assert info["fit_history"].best_loss < info["fit_history"].loss[0]

    def test_default_height_aims_at_64_keys_per_leaf(self):
        q, k, v = random_qkv(0, batch=(), Nq=4, Nk=300, D=2, Dv=1)
        _, info = self.run(q, k, v, return_info=True)
        assert info["height"] == 2                                          # floor(log2(300 / 64))
        assert tfm.default_height(127) == 0 and tfm.default_height(128) == 1 and tfm.default_height(4096) == 6

    def test_bad_parameters_raise_clear_errors(self):
        q, k, v = random_qkv(0, batch=(2, 3), Nq=4, Nk=5, D=4, Dv=2)
        with pytest.raises(ValueError, match="height=-1 is too small"):
            self.run(q, k, v, height=-1)
        with pytest.raises(ValueError, match="height=21 is too large"):
            self.run(q, k, v, height=21)
        with pytest.raises(ValueError, match="built for D=3 features but the inputs have D=4"):
            self.run(q, k, v, state=tfm.init_tree(3, 2, rng=0))
        with pytest.raises(ValueError, match=r"tree shape \(5,\) does not broadcast"):
            self.run(q, k, v, state=tfm.init_tree(4, 2, tree_shape=(5,), rng=0))
        with pytest.raises(ValueError, match=r"tree shape \(2, 2, 3\) does not broadcast"):
            self.run(q, k, v, state=tfm.init_tree(4, 2, tree_shape=(2, 2, 3), rng=0))
        with pytest.raises(ValueError, match="height=3 does not match the given state's height 2"):
            self.run(q, k, v, state=tfm.init_tree(4, 2, rng=0), height=3)
        with pytest.raises(ValueError, match="tree_init='random' is only used when the call builds the tree"):
            self.run(q, k, v, state=tfm.init_tree(4, 2, rng=0), tree_init="random")
        with pytest.raises(ValueError, match="rng is unused when state= is given"):
            self.run(q, k, v, state=tfm.init_tree(4, 2, rng=0), rng=0)
        with pytest.raises(ValueError, match="tree_init='bogus' is not one of"):
            self.run(q, k, v, tree_init="bogus")
        with pytest.raises(TypeError, match="state must be a TreeformerState"):
            self.run(q, k, v, state={"w": 0})
        self.run(q, k, v, state=tfm.init_tree(4, 2, tree_shape=(1, 3), rng=0))   # broadcasting trees are fine

    def test_info_keys(self):
        rng = np.random.default_rng(0)
        q, k, v = dyadic_qkv(rng, (2,), 6, 8, 3, 2)
        out, info = self.run(q, k, v, state=dyadic_tree(rng, 2, 3), return_info=True)
        common = {"method", "backend", "params", "flops", "empty_rows", "height", "state", "state_source", "leaf_q",
                  "leaf_k", "leaf_counts_q", "leaf_counts_k", "flops_exact", "flop_ratio"}
        own = {"frac_empty_rows", "pairs", "density", "balance"} if self.is_tf else {
            "node_counts", "mean_path_len", "mean_root_weight", "mean_leaf_weight"}
        assert common | own <= set(info)
        assert info["method"] == self.METHOD and info["backend"] == self.BACKEND
        assert info["state_source"] == "given" and info["params"]["height"] == 2
        assert to_host(info["leaf_counts_k"]).shape == (2, 4)
        assert info["flop_ratio"] == pytest.approx(info["flops_exact"] / info["flops"])
        if self.BACKEND == "cupy" and self.is_tf:
            assert 0.25 <= info["pair_efficiency"] <= 1


class TestTreeformerTF(_TreeCase):
    METHOD = "treeformer_tf"

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_height_zero_equals_exact_attention(self, causal, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = self.sizes((4, 6), (13, 17))
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=3, Dv=2)
        mask = rng.random((2, Nk)) > 0.3
        expected = dense_attention(q, k, v, visible_matrix(Nq, Nk, mask, causal))[0]
        assert_close(self.run(q, k, v, state=empty_tree(3), mask=mask, causal=causal), expected, rel=1e-12)
        assert_close(self.run(q, k, v, height=0, mask=mask, causal=causal), expected, rel=1e-12)

    def test_hand_example_values(self):
        out, info = self.run(HAND_Q, HAND_K, HAND_V, state=HAND_TREE, scale=1.0, return_info=True)
        assert_close(out, [[3.6423912339], [2.0], [3.9972668464]], rel=1e-10)
        assert info["balance"] == pytest.approx(5 / 4.5) and info["pairs"] == 5
        out, info = self.run(HAND_Q, HAND_K, HAND_V, state=HAND_TREE, scale=1.0, mask=HAND_MASK, return_info=True)
        assert_close(out, [[3.6423912339], [0.0], [3.9972668464]], rel=1e-10)
        assert to_host(info["empty_rows"]).tolist() == [False, True, False]
        assert info["frac_empty_rows"] == pytest.approx(1 / 3)

    def test_equals_exact_attention_masked_by_the_routed_leaves(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = self.sizes((5, 7), (30, 41))
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=4, Dv=3)
        tree = tfm.init_tree(4, 2, rng=rng, q=q, k=k)
        mask = rng.random((2, Nk)) > 0.3
        out, info = self.run(q, k, v, state=tree, mask=mask, causal=True, return_info=True)
        leaf_q, leaf_k = to_host(info["leaf_q"]), to_host(info["leaf_k"])
        M = (leaf_q[..., :, None] == leaf_k[..., None, :]) & mask[:, None, :] & visible_matrix(Nq, Nk, None, True)
        assert_close(out, dense_attention(q, k, v, M)[0], rel=1e-10)
        assert (to_host(info["empty_rows"]) == ~M.any(-1)).all()
        assert info["pairs"] == M.sum() and info["density"] == pytest.approx(
            M.sum() / visible_matrix(Nq, Nk, mask, True).sum())

    def test_never_attends_across_leaves(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = self.sizes((5, 8), (24, 40))
        q, k, v = dyadic_qkv(rng, (1,), Nq, Nk, 3, 2)
        tree = dyadic_tree(rng, 2, 3)
        out, info = self.run(q, k, v, state=tree, return_info=True)
        leaf_q, leaf_k = to_host(info["leaf_q"])[0], to_host(info["leaf_k"])[0]
        for leaf in np.unique(leaf_q):
            others = leaf_k != leaf
            v2 = v.copy()
            v2[0, others] = 100 * rng.standard_normal((others.sum(), 2))   # keys of other leaves only
            rows = leaf_q == leaf
            assert np.array_equal(to_host(self.run(q, k, v2, state=tree))[0, rows], to_host(out)[0, rows])
        _, vjp = self.run_vjp(q, k, v, state=tree)
        dout = np.zeros((1, Nq, 2))
        dout[0, 0] = 1.0
        _, dk, dv = (to_host(g) for g in vjp(self.xp_in(dout)))
        assert (dv[0, leaf_k != leaf_q[0]] == 0).all() and (dk[0, leaf_k != leaf_q[0]] == 0).all()

    def test_queries_equal_to_keys_leave_no_row_empty(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        N = 6 if self.small else 50
        q, _, v = random_qkv(rng, batch=(2,), Nq=N, Nk=N, D=4, Dv=2)
        _, info = self.run(q, q, v, state=tfm.init_tree(4, 3, rng=rng), return_info=True)
        assert not to_host(info["empty_rows"]).any()

    def test_causal_rule_applies_within_leaves(self):
        rng = np.random.default_rng(5)
        q, k, v = dyadic_qkv(rng, (1,), 4, 7, 3, 2)
        tree = dyadic_tree(rng, 1, 3)
        for causal in CAUSAL_MODES[1:]:
            out = self.run(q, k, v, state=tree, causal=causal)
            assert_close(out, tf_oracle(q, k, v, tree, None, causal)[0], rel=1e-12)

    def test_large_scores_stay_finite_in_float32(self):
        rng = np.random.default_rng(3)
        q, k, v = dyadic_qkv(rng, (2,), 6, 8, 16, 3)
        tree = dyadic_tree(rng, 1, 16)
        s = 90.0 / np.abs(np.einsum("gid,gjd->gij", q, k)).max()            # scores up to +-90
        out = self.run(*(a.astype(np.float32) for a in (q, k, v)), state=tree, scale=s)
        assert np.isfinite(to_host(out)).all()
        assert_close(out, tf_oracle(q, k, v, tree, scale=s)[0], rel=1e-5)


class TestTreeformerTFNumba(TestTreeformerTF):
    BACKEND = "numba"


@pytest.mark.gpu
class TestTreeformerTFCupy(TestTreeformerTF):
    BACKEND = "cupy"


@pytest.mark.cudasim
class TestTreeformerTFCupyEmulated(TestTreeformerTF):
    BACKEND = "cupy"
    EMULATED = True


class TestTreeformerTC(_TreeCase):
    METHOD = "treeformer_tc"

    def test_height_zero_is_the_mean_of_the_kept_values(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = self.sizes((4, 6), (13, 17))
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=3, Dv=2)
        mask = rng.random((2, Nk)) > 0.3
        mask[:, 0] = True
        mean = (v * mask[..., None]).sum(1, keepdims=True) / mask.sum(1)[:, None, None]
        assert_close(self.run(q, k, v, state=empty_tree(3), mask=mask), np.broadcast_to(mean, (2, Nq, 2)), rel=1e-12)

    def test_hand_example_values(self):
        out = self.run(HAND_Q, HAND_K, HAND_V, state=HAND_TREE, scale=1.0)
        assert_close(out, [[2.4551764298], [2.0529563683], [2.4604236619]], rel=1e-10)
        # query 1 by hand: root mean (2/3, 1/3) with vbar 7/3, left leaf (1.5, .5) with vbar 2.5
        alpha = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
        assert_close(out[0], [alpha @ [7 / 3, 2.5]], rel=1e-12)
        out, info = self.run(HAND_Q, HAND_K, HAND_V, state=HAND_TREE, scale=1.0, mask=HAND_MASK, return_info=True)
        assert_close(out, [[2.5], [2.5], [2.5]], rel=1e-12)
        assert to_host(info["node_counts"]).tolist() == [2, 2, 0]

    def test_causal_is_refused_with_the_reason(self):
        q, k, v = random_qkv(0)
        with pytest.raises(eff_attn.NotSupportedError, match="treeformer_tc: causal=True is not supported: TC "
                                                             "attends to node centroids"):
            self.run(q, k, v, causal=True, height=1)

    def test_node_counts_add_up_from_the_leaves(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nk = 8 if self.small else 60
        q, k, v = dyadic_qkv(rng, (2,), 5, Nk, 3, 2)
        mask = rng.random((2, Nk)) > 0.3
        h = 2 if self.small else 3
        _, info = self.run(q, k, v, state=dyadic_tree(rng, h, 3), mask=mask, return_info=True)
        counts = to_host(info["node_counts"])
        internal = 2**h - 1
        assert (counts[:, 0] == mask.sum(-1)).all()
        for m in range(internal):
            assert (counts[:, m] == counts[:, 2 * m + 1] + counts[:, 2 * m + 2]).all()
        assert (counts[:, internal:] == to_host(info["leaf_counts_k"])).all()
        assert 1 <= info["mean_path_len"] <= h + 1
        assert 0 <= info["mean_leaf_weight"] <= 1 and 0 <= info["mean_root_weight"] <= 1


class TestTreeformerTCNumba(TestTreeformerTC):
    BACKEND = "numba"


@pytest.mark.gpu
class TestTreeformerTCCupy(TestTreeformerTC):
    BACKEND = "cupy"


@pytest.mark.cudasim
class TestTreeformerTCCupyEmulated(TestTreeformerTC):
    BACKEND = "cupy"
    EMULATED = True


# --- the tree: state, routing, initialisers ---------------------------------------------------


def test_state_checks_shapes_height_and_finiteness():
    with pytest.raises(ValueError, match="height=-1 is too small"):
        TreeformerState(np.zeros((0, 2)), np.zeros(0), -1)
    with pytest.raises(ValueError, match="I = 2\\*\\*height - 1 = 3"):
        TreeformerState(np.zeros((2, 2)), np.zeros(2), 2)
    with pytest.raises(ValueError, match="b must have shape"):
        TreeformerState(np.zeros((3, 2)), np.zeros(2), 2)
    with pytest.raises(ValueError, match="finite"):
        TreeformerState(np.full((1, 2), np.nan), np.zeros(1), 1)
    tree = TreeformerState(np.ones((4, 3, 5)), np.zeros((4, 3)), 2)
    assert (tree.num_internal, tree.num_leaves, tree.num_nodes, tree.dim, tree.tree_shape) == (3, 4, 7, 5, (4,))
    assert not tree.w.flags.writeable


def test_walk_leaf_is_the_argmax_of_the_split_sign_form(global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    for h in range(5):
        x = rng.standard_normal((40, 4))
        tree = TreeformerState(tfm.init_tree(4, h, rng=rng).w, 0.3 * rng.standard_normal(2**h - 1), h)
        leaf = tfm.route(x, tree)
        assert (leaf == naive_leaves(x, tree)).all()
        S = tfm.split_sign_matrix(h)
        z = x @ tree.w.T + tree.b                                           # (N, I)
        u = np.where(z >= 0, 1.0, -1.0) @ S.T                               # (N, L)
        assert (np.argmax(u, axis=-1) == leaf).all()
        assert ((u == h).sum(-1) == 1).all() and (np.sort(u, -1)[:, :-1] <= h - 2).all()
        nodes = tfm.path_nodes(leaf, h)                                     # (N, h+1)
        walk = np.zeros((len(x), h + 1), dtype=np.int64)
        for n in range(len(x)):
            m = 0
            for t in range(h):
                walk[n, t] = m
                m = 2 * m + 1 + (z[n, m] < 0)
            walk[n, h] = m
        assert (nodes == walk).all()
        A = tfm.ancestor_matrix(h)                                          # (2L-1, L)
        for leaf in range(2**h):
            assert set(np.flatnonzero(A[:, leaf])) == set(tfm.path_nodes(np.array([leaf]), h)[0])


def test_ties_go_left_and_negating_the_root_split_swaps_only_off_boundary_points():
    tree = TreeformerState(np.array([[1.0, 0.0]]), np.array([0.0]), 1)
    x = np.array([[0.0, 5.0], [-0.0, 1.0], [2.0, 1.0], [-3.0, 0.0]])
    assert tfm.route(x, tree).tolist() == [0, 0, 0, 1]
    flipped = TreeformerState(-tree.w, -tree.b, 1)
    assert tfm.route(x, flipped).tolist() == [0, 0, 1, 0]
    assert tfm.route(x, tree, mask=np.array([True, False, True, True])).tolist() == [0, -1, 0, 1]


def test_route_takes_float32_and_per_head_trees():
    rng = np.random.default_rng(1)
    x = rng.integers(-8, 9, size=(2, 3, 10, 4)) / 4
    tree = dyadic_tree(rng, 3, 4, tree_shape=(3,))
    assert (tfm.route(x.astype(np.float32), tree) == naive_leaves(x, tree)).all()
    assert tfm.path_nodes(np.array([-1, 3]), 2).tolist() == [[-1, -1, -1], [0, 2, 6]]


def rank_split(p):
    """Midway between the two middle projections by rank: the median for an even count (random data)."""
    p = np.sort(p)
    return (p[len(p) // 2 - 1] + p[len(p) // 2]) / 2


def test_split_of_an_odd_count_sits_between_points_not_on_one():
    rng = np.random.default_rng(7)
    q, k, _ = random_qkv(rng, batch=(), Nq=20, Nk=11, D=4)                  # 31 points: the median is a point
    tree = tfm.init_tree_pca(q, k, 1)
    p = np.concatenate([q, k]) @ tree.w[0]
    assert (p + tree.b[0] < 0).sum() == 15                                  # floor(31 / 2) go right
    assert np.abs(p + tree.b[0]).min() > 1e-3 * np.abs(p).max()             # no point near the hyperplane
    assert tree.b[0] == pytest.approx(-rank_split(p), abs=1e-12)


def test_tied_points_move_the_split_to_the_nearest_gap():
    x = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0])[:, None]            # middle gap (1 | 1) is empty
    tree = tfm.init_tree_pca(x, x[:0], 1)
    assert tree.w[0, 0] == 1.0 and tree.b[0] == -0.5                        # gaps at ranks 1 and 5 tie: the lower
    same = tfm.init_tree_pca(np.ones((5, 2)), np.ones((0, 2)), 2)
    assert (tfm.route(np.ones((5, 2)), same) == 0).all()                    # no gap at all: every point left
    assert (np.ones((5, 2)) @ same.w[0] + same.b[0] > 0).all()


def test_pca_median_init_is_balanced_signed_and_deterministic():
    rng = np.random.default_rng(2)
    q, k, _ = random_qkv(rng, batch=(), Nq=64, Nk=64, D=5)
    tree = tfm.init_tree_pca(q, k, 3)
    counts = np.bincount(np.concatenate([tfm.route(q, tree), tfm.route(k, tree)]), minlength=8)
    assert counts.max() - counts.min() <= 2                                 # 128 points, medians: 16 +- 1
    X = np.concatenate([q, k])
    top = np.linalg.svd(X - X.mean(0))[2][0]
    top = top if top[np.argmax(np.abs(top))] > 0 else -top
    assert_close(tree.w[0], top, rel=1e-12)
    assert tree.b[0] == pytest.approx(-rank_split(X @ top), abs=1e-12)
    again = tfm.init_tree_pca(q, k, 3)
    assert np.array_equal(again.w, tree.w) and np.array_equal(again.b, tree.b)
    lonely = tfm.init_tree_pca(q[:1], k[:0], 2)                             # fewer than two points: e_0, bias 0
    assert_close(lonely.w[1], np.eye(5)[0], rel=0) and lonely.b[2] == 0


def test_per_head_init_pools_over_the_batch_axis():
    rng = np.random.default_rng(3)
    q, k, _ = random_qkv(rng, batch=(2, 3), Nq=20, Nk=20, D=4)
    tree = tfm.init_tree_pca(q, k, 2, tree_shape=(3,))
    assert tree.tree_shape == (3,)
    head1 = tfm.init_tree_pca(np.concatenate([q[0, 1], q[1, 1]])[None], np.concatenate([k[0, 1], k[1, 1]])[None], 2)
    assert_close(tree.w[1], head1.w[0], rel=1e-10)                          # same points, pooled in another order
    assert_close(tree.b[1], head1.b[0], rel=1e-10)


def test_bias_update_recentres_on_medians_and_depth_update_keeps_old_nodes():
    rng = np.random.default_rng(4)
    q, k, _ = random_qkv(rng, batch=(), Nq=50, Nk=31, D=3)
    mask = rng.random(31) > 0.3
    tree = tfm.init_tree(3, 2, rng=0)
    centred = tfm.update_tree_bias(tree, q, k, mask=mask)
    X = np.concatenate([q, k[mask]])
    assert centred.b[0] == pytest.approx(-rank_split(X @ tree.w[0]), abs=1e-12)
    root_only = TreeformerState(centred.w[:1], centred.b[:1], 1)
    left = X[tfm.route(X, root_only) == 0]
    assert centred.b[1] == pytest.approx(-rank_split(left @ tree.w[1]), abs=1e-12)
    deeper = tfm.update_tree_depth(centred, q, k, mask=mask)
    assert deeper.height == 3 and np.array_equal(deeper.w[:3], centred.w) and np.array_equal(deeper.b[:3], centred.b)
    in_leaf2 = X[tfm.route(X, centred) == 2]
    assert deeper.b[3 + 2] == pytest.approx(-rank_split(in_leaf2 @ deeper.w[5]), abs=1e-12)
    ids = tfm.route(X, deeper) >> 1
    assert (ids == tfm.route(X, centred)).all()                             # children refine the old leaves


def test_init_tree_draws_unit_directions_from_rng():
    a = tfm.init_tree(6, 3, tree_shape=(2,), rng=5)
    assert_close(np.linalg.norm(a.w, axis=-1), np.ones((2, 7)), rel=1e-12)
    assert np.array_equal(a.w, tfm.draw_treeformer_directions(np.random.default_rng(5), (2,), 7, 6))
    assert (a.b == 0).all()
    with pytest.raises(ValueError, match="both q and k"):
        tfm.init_tree(6, 3, q=np.zeros((2, 6)))


# --- FLOPs -------------------------------------------------------------------------------------------


def test_flops_reproduce_the_spec_table():
    from eff_attn.methods.exact import flops as exact_flops

    table = {(512, "tf", 5): 24.5, (512, "tf", 6): 36.9, (512, "tf", 7): 47.1, (512, "tc", 6): 37.8,
             (4096, "tf", 5): 30.8, (4096, "tf", 6): 58.6, (4096, "tf", 7): 105.4, (4096, "tc", 6): 305.7}
    for (n, variant, h), ratio in table.items():
        f = (tfm.flops_tf if variant == "tf" else tfm.flops_tc)(n, n, 64, height=h)
        assert round(exact_flops(n, n, 64) / f, 1) == ratio


def test_flops_from_routed_counts():
    a, c = np.array([[2, 1]]), np.array([[2, 0]])                          # the masked hand example
    assert tfm.flops_tf(3, 3, 2, 1, height=1, leaf_counts_q=a, leaf_counts_k=c) == 2 * 1 * 2 * 5 + 4 * 11
    assert tfm.flops_tc(3, 3, 2, 1, height=1, leaf_counts_q=a, leaf_counts_k=c) == 93
    assert tfm.flops_tf(3, 3, 2, 1, height=1, leaf_counts_q=a, leaf_counts_k=c, backward=True) == 64 + 4 * (12 + 4 + 5)
    with pytest.raises(ValueError, match="pairs="):
        tfm.flops_tf(3, 3, 2, 1, height=1, leaf_counts_q=a, leaf_counts_k=c, causal=True)
    with pytest.raises(eff_attn.NotSupportedError):
        tfm.flops_tc(4, 4, 2, causal=True)
    assert (tfm.node_counts_from_leaves(np.array([1, 2, 0, 4]), 2) == [7, 3, 4, 1, 2, 0, 4]).all()


# --- leaf gradients and the surrogate ----------------------------------------------------------------


def _relaxed_tf(q, k, v, Pq, Pk, visible, scale):
    """TF output as a function of continuous leaf matrices: sum_j M e^s v / sum_j M e^s."""
    M = (Pq @ Pk.T) * visible
    e = M * np.exp(scale * q @ k.T)
    total = e.sum(-1, keepdims=True)
    return (e @ v) / np.where(total > 0, total, 1.0)


def _relaxed_tc(q, k, v, Pq, Pk, keep, nonempty, h, scale, A):
    """TC output as a function of continuous path indicators pi = Pq A^T and C = Pk A^T (emptiness frozen)."""
    pi = Pq @ A.T
    C = (Pk @ A.T) * keep[:, None]
    N = C.sum(0)
    kbar = (C.T @ k) / np.where(nonempty, N, 1)[:, None]
    vbar = (C.T @ v) / np.where(nonempty, N, 1)[:, None]
    e = pi * nonempty * np.exp(scale * q @ kbar.T)
    return (e @ vbar) / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("variant", ["tf", "tc"])
def test_leaf_gradients_match_differences_of_the_relaxed_operator(variant):
    rng = np.random.default_rng(8)
    h, L = 2, 4
    q, k, v = random_qkv(rng, batch=(1,), Nq=7, Nk=9, D=3, Dv=2)
    tree = tfm.init_tree(3, h, rng=rng, q=q, k=k)
    keep = rng.random(9) > 0.2
    leaf_q = tfm.route(q, tree)
    leaf_k = tfm.route(k, tree, mask=keep[None])
    dout = rng.standard_normal((1, 7, 2))
    visible = visible_matrix(7, 9, keep[None], variant == "tf")
    g_q, g_k = tfm.leaf_gradients(q, k, v, leaf_q, leaf_k, dout, variant=variant, height=h, scale=0.5,
                                  visible=visible)
    Pq = (leaf_q[0][:, None] == np.arange(L)).astype(float)
    Pk = (leaf_k[0][:, None] == np.arange(L)).astype(float)
    if variant == "tf":
        rows = ((Pq @ Pk.T) * visible[0]).sum(-1) > 0                      # rows with an own-leaf key
        dout[0, ~rows] = 0                                                  # empty rows follow their own rule
        g_q, g_k = tfm.leaf_gradients(q, k, v, leaf_q, leaf_k, dout, variant=variant, height=h, scale=0.5,
                                      visible=visible)

        def f(a, b):
            return _relaxed_tf(q[0], k[0], v[0], a, b, visible[0], 0.5)[rows]

        own = np.take_along_axis(g_q[0], leaf_q[0][:, None], axis=-1)
        assert np.abs(own).max() < 1e-14                                    # queries learn only from other leaves
    else:
        A = tfm.ancestor_matrix(h)
        nonempty = ((Pk * keep[:, None]) @ A.T).sum(0) > 0
        rows = np.ones(7, dtype=bool)

        def f(a, b):
            return _relaxed_tc(q[0], k[0], v[0], a, b, keep, nonempty, h, 0.5, A)

    eq, ek = finite_difference_vjp(f, [Pq, Pk], dout[0][rows])
    assert_close(g_q[0][rows], eq[rows], rel=1e-7, atol=1e-7, what="g_q")
    assert_close(g_k[0][keep], ek[keep], rel=1e-7, atol=1e-7, what="g_k")


def _naive_tree_vjp(q, k, tree, g_q, g_k, keep, temperature, ste_window):
    """The surrogate per point: explicit paths for u, the softmax Jacobian, the hardtanh window."""
    h, L, I = tree.height, 2**tree.height, 2**tree.height - 1
    points = list(zip(q, g_q)) + [(x, g) for x, g, kept in zip(k, g_k, keep) if kept]
    Z = np.array([tree.w @ x + tree.b for x, _ in points])                 # (n, I)
    omega = ste_window * (np.abs(Z).mean(0) + 1e-12)
    dS = np.zeros((L, I))                                                   # du_l / da_i from each leaf's path
    for leaf in range(L):
        m = 0
        for t in range(h):
            right = (leaf >> (h - t - 1)) & 1
            dS[leaf, m] = -1.0 if right else 1.0
            m = 2 * m + 1 + right
    dw, db = np.zeros_like(tree.w), np.zeros_like(tree.b)
    for (x, g), z in zip(points, Z):
        a = np.where(z >= 0, 1.0, -1.0)
        u = dS @ a
        p = np.exp((u - u.max()) / temperature)
        p /= p.sum()
        jac = (np.diag(p) - np.outer(p, p)) / temperature                   # dp/du
        dz = (jac.T @ g) @ dS * (np.abs(z) <= omega) / omega
        dw += np.outer(dz, x)
        db += dz
    return dw, db


@pytest.mark.parametrize("variant", ["tf", "tc"])
def test_tree_vjp_equals_a_per_point_loop_and_scales_inversely(variant):
    rng = np.random.default_rng(9)
    q, k, v = random_qkv(rng, batch=(), Nq=12, Nk=15, D=3, Dv=2)
    keep = rng.random(15) > 0.2
    tree = tfm.init_tree(3, 3, rng=rng, q=q, k=k)
    dout = rng.standard_normal((12, 2))
    grad = tfm.tree_vjp(q, k, v, tree, dout, variant=variant, mask=keep, temperature=0.7, ste_window=1.3)
    g_q, g_k = tfm.leaf_gradients(q[None], k[None], v[None], tfm.route(q, tree)[None],
                                  tfm.route(k, tree, mask=keep)[None], dout[None], variant=variant, height=3,
                                  scale=1 / np.sqrt(3), visible=keep[None, None, :])
    dw, db = _naive_tree_vjp(q, k, tree, g_q[0], g_k[0], keep, 0.7, 1.3)
    assert_close(grad.dw, dw, rel=1e-8)
    assert_close(grad.db, db, rel=1e-8)
    assert grad.dq_route.shape == q.shape and (grad.dk_route[~keep] == 0).all()
    scaled = tfm.tree_vjp(q, k, v, TreeformerState(4 * tree.w, 4 * tree.b, 3), dout, variant=variant, mask=keep,
                          temperature=0.7, ste_window=1.3)
    assert_close(scaled.dw, grad.dw / 4, rel=1e-10)
    assert_close(scaled.db, grad.db / 4, rel=1e-10)
    assert_close(scaled.dq_route, grad.dq_route, rel=1e-10)


def test_points_outside_the_window_get_no_gradient():
    rng = np.random.default_rng(10)
    q, k, v = random_qkv(rng, batch=(), Nq=10, Nk=10, D=2, Dv=2)
    tree = tfm.init_tree(2, 1, rng=rng, q=q, k=k)
    z = np.concatenate([q, k]) @ tree.w[0] + tree.b[0]                      # (20,) the root's split scores
    far = np.abs(z) > 0.5 * (np.abs(z).mean() + 1e-12)
    assert far.any() and (~far).any()
    grad = tfm.tree_vjp(q, k, v, tree, rng.standard_normal((10, 2)), variant="tc", ste_window=0.5)
    assert (grad.dq_route[far[:10]] == 0).all() and (grad.dk_route[far[10:]] == 0).all()
    assert np.abs(np.concatenate([grad.dq_route, grad.dk_route])[~far]).max() > 0


# --- fitting -----------------------------------------------------------------------------------------


def planted(seed, n=256, D=16, C=8, Dv=8):
    """The spec's planted-cluster task (section 8.12), drawn in its order."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(C, 8))
    mu *= 4 / np.linalg.norm(mu, axis=1, keepdims=True)
    nu = rng.normal(size=(C, Dv))
    cq, ck = rng.integers(0, C, n), rng.integers(0, C, n)
    q = np.zeros((n, D))
    q[:, :8] = mu[cq] + 0.5 * rng.normal(size=(n, 8))
    k = np.zeros((n, D))
    k[:, :8] = mu[ck] + 0.5 * rng.normal(size=(n, 8))
    k[:, 8:] = 3 * rng.normal(size=(n, D - 8))
    v = nu[ck] + 0.5 * rng.normal(size=(n, Dv))
    return q, k, v


def test_fit_lowers_the_loss_on_the_planted_task_and_beats_untrained_trees():
    ratios = {"tf": [], "tc": []}
    for seed in range(3):
        q, k, v = planted(seed)
        exact = dense_attention(q, k, v, True)[0]
        start = tfm.init_tree_pca(q, k, 3)
        for variant in ("tf", "tc"):
            tree, history = tfm.fit_tree(start, q, k, v, variant=variant, progress=False)
            assert history.best_loss <= history.loss[0] and len(history.loss) == 201
            assert history.loss[-1] < history.loss[0]                      # the loss decreases
            out, info = eff_attn.attention(q, k, v, method=f"treeformer_{variant}", backend="numpy", state=tree,
                                           return_info=True)
            fitted = np.linalg.norm(out - exact) / np.linalg.norm(exact)
            assert fitted**2 == pytest.approx(history.best_loss, rel=1e-9)
            initial = np.sqrt(history.loss[0])
            ratios[variant].append(fitted / initial)
            random_tree = tfm.init_tree(16, 3, rng=seed, q=q, k=k)
            untrained = eff_attn.attention(q, k, v, method=f"treeformer_{variant}", backend="numpy", state=random_tree)
            assert fitted < np.linalg.norm(untrained - exact) / np.linalg.norm(exact)
            if variant == "tf":
                assert info["balance"] <= 1.2
    assert max(ratios["tf"]) <= 0.85 and np.mean(ratios["tf"]) <= 0.7
    assert max(ratios["tc"]) <= 0.5


def test_fit_is_deterministic_a_no_op_at_height_zero_and_validates():
    q, k, v = planted(0, n=64)
    start = tfm.init_tree_pca(q, k, 2)
    a = tfm.fit_tree(start, q, k, v, steps=15, progress=False)
    b = tfm.fit_tree(start, q, k, v, steps=15, progress=False)
    assert np.array_equal(a[0].w, b[0].w) and np.array_equal(a[1].loss, b[1].loss)
    flat = tfm.init_tree_pca(q, k, 0)
    tree, history = tfm.fit_tree(flat, q, k, v, progress=False)
    assert tree.height == 0 and len(history.loss) == 1 and history.phases == ((0, "tf", 0, 1),)
    with pytest.raises(ValueError, match="built for D=16"):
        tfm.fit_tree(tfm.init_tree(16, 2, rng=0), q[:, :4], k[:, :4], v, progress=False)
    with pytest.raises(eff_attn.NotSupportedError, match="treeformer_tc: causal=True"):
        tfm.fit_tree(start, q, k, v, variant="tc", causal=True, progress=False)
    with pytest.raises(ValueError, match="variant='xx' is not one of"):
        tfm.fit_tree(start, q, k, v, variant="xx", progress=False)
    with pytest.raises(ValueError, match="lr=0.0 is out of range"):
        tfm.fit_tree(start, q, k, v, lr=0.0, progress=False)


def test_fit_with_a_causal_mask_and_a_per_head_tree():
    rng = np.random.default_rng(6)
    q, k, v = random_qkv(rng, batch=(2, 2), Nq=24, Nk=24, D=4, Dv=2)
    mask = rng.random((2, 1, 24)) > 0.2
    start = tfm.init_tree_pca(q, k, 2, mask=mask, tree_shape=(2,))
    tree, history = tfm.fit_tree(start, q, k, v, mask=mask, causal=True, steps=20, progress=False)
    assert tree.tree_shape == (2,) and history.best_loss <= history.loss[0]
    out = eff_attn.attention(q, k, v, method="treeformer_tf", backend="numpy", state=tree, mask=mask, causal=True)
    exact = dense_attention(q, k, v, visible_matrix(24, 24, mask, True))[0]
    assert np.sum((out - exact) ** 2) / np.sum(exact**2) == pytest.approx(history.best_loss, rel=1e-9)


def test_bootstrap_grows_the_tree_phase_by_phase():
    q, k, v = planted(1, n=96)
    tree, history = tfm.fit_tree_bootstrap(q, k, v, 3, tc_steps=5, tf_steps=5, progress=False)
    assert tree.height == 3
    assert [p[:2] for p in history.phases] == [(1, "tc"), (1, "tf"), (2, "tc"), (2, "tf"), (3, "tc"), (3, "tf")]
    assert history.phases[-1][3] == len(history.loss) == 36
    last = history.phases[-1]
    assert last[2] <= history.best_index < last[3]
    assert history.best_loss == min(history.loss[last[2]:last[3]])
    tc_tree, tc_history = tfm.fit_tree_bootstrap(q, k, v, 2, variant="tc", tc_steps=3, progress=False)
    assert [p[1] for p in tc_history.phases] == ["tc", "tc"] and tc_tree.height == 2


def test_fit_shows_a_progress_bar(capsys):
    q, k, v = planted(2, n=32)
    tfm.fit_tree(tfm.init_tree_pca(q, k, 1), q, k, v, steps=3, progress=True)
    captured = capsys.readouterr()
    assert "fit_tree" in captured.out + captured.err


def test_tree_init_fit_chooses_its_tree_on_held_out_queries_reproducibly():
    rng = np.random.default_rng(12)
    q, k, v = random_qkv(rng, batch=(1,), Nq=300, Nk=150, D=4, Dv=2)
    kwargs = dict(method="treeformer_tc", backend="numpy", height=2, tree_init="fit", return_info=True)
    _, info = eff_attn.attention(q, k, v, rng=3, **kwargs)
    _, again = eff_attn.attention(q, k, v, rng=3, **kwargs)
    history = info["fit_history"]
    assert len(history.loss) == len(history.holdout_loss) == tfm.FIT_STEPS + 1
    assert history.best_index == int(np.argmin(history.holdout_loss))
    assert np.array_equal(info["state"].w, again["state"].w)
    # The start is the call's pca_median tree, scored on the second sample of 128 rows drawn by rng.
    rows = np.sort(np.random.default_rng(3).permutation(300)[128:256])
    pca = eff_attn.attention(q, k, v, method="treeformer_tc", backend="numpy", height=2)[0, rows]
    exact = dense_attention(q, k, v, True)[0][0, rows]
    assert history.holdout_loss[0] == pytest.approx(np.sum((pca - exact) ** 2) / np.sum(exact**2), rel=1e-10)


def test_height_beyond_what_the_points_can_use_is_refused_before_allocating():
    q, k, v = random_qkv(np.random.default_rng(0), batch=(1,), Nq=16, Nk=16, D=8)
    with pytest.raises(ValueError, match=r"height=20 is too large for a tree built from this call's Nq \+ Nk = 32"):
        eff_attn.attention(q, k, v, method="treeformer_tc", backend="numpy", height=20)
    out = eff_attn.attention(q, k, v, method="treeformer_tc", backend="numpy", height=5)   # 32 leaves: allowed
    assert np.isfinite(out).all()


@pytest.mark.parametrize("method", ["treeformer_tf", "treeformer_tc"])
def test_nan_query_propagates_instead_of_failing_the_svd(method):
    q, k, v = random_qkv(np.random.default_rng(1), batch=(1,), Nq=40, Nk=40, D=4)
    q[0, 3] = np.nan
    out = eff_attn.attention(q, k, v, method=method, backend="numpy", height=2, check_finite=False)
    assert np.isnan(out[0, 3]).all() and np.isfinite(np.delete(out[0], 3, axis=0)).all()


@pytest.mark.parametrize("name", ["treeformer_tf", "treeformer_tc"])
def test_the_budget_sweep_keeps_leaves_of_32_to_256_keys_at_every_length(name):
    method = eff_attn.registry.get_method(name)
    assert [b["height"] for b in method.sweep(2048)] == [6, 5, 4, 3]       # the sweep of the default problem
    assert [b["height"] for b in method.sweep(512)] == [4, 3, 2, 1]
    assert [b["height"] for b in method.sweep(256)] == [3, 2, 1]            # no height 0 (exact attention)
    for Nk in (1000, 4096, 65536):
        heights = [b["height"] for b in method.sweep(Nk)]
        assert heights == sorted(heights, reverse=True) and len(heights) == 4      # cheapest (most leaves) first
        assert all(32 <= Nk / 2**h < 2 * 256 for h in heights), (Nk, heights)
        assert all(b["tree_init"] == "fit" for b in method.sweep(Nk))
    assert [b["height"] for b in method.sweep(64)] == [1]
