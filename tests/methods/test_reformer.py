"""Tests of ``reformer``: the spec's oracles, backend agreement, properties, gradients.

Expected values come from hand computation, ``tests._oracles.dense_attention``
or ``union_oracle`` below: a dense (N, N) softmax over the union of the
chunk windows, rebuilt from the bucket ids with ``numpy.argsort(kind="stable")``
and explicit window membership. None of them calls the package's code.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

import eff_attn
from eff_attn.methods.reformer import (
    default_num_buckets,
    draw_reformer_rotations,
    hash_buckets,
)
from eff_attn.testing import assert_close, finite_difference_vjp, random_qkv, relative_error, to_host
from tests._harness import BackendCase
from tests._oracles import dense_attention, visible_matrix


def window_counts(bq, bk, c):
    """``c_ij``: rounds whose chunk window pairs query i with key j, shape (G, N, N).

    ``bq``, ``bk`` are (R, G, N) bucket ids; queries and keys are sorted by
    (bucket, position) and query chunk u sees key chunks u and u - 1 (mod n_c).
    """
    R, G, N = bq.shape
    n_c = -(-N // c)
    counts = np.zeros((G, N, N), dtype=int)
    for r in range(R):
        for g in range(G):
            chunk_q, chunk_k = np.empty(N, int), np.empty(N, int)
            chunk_q[np.argsort(bq[r, g], kind="stable")] = np.arange(N) // c
            chunk_k[np.argsort(bk[r, g], kind="stable")] = np.arange(N) // c
            own = chunk_k[None, :] == chunk_q[:, None]
            previous = chunk_k[None, :] == (chunk_q[:, None] - 1) % n_c
            counts[g] += own | (previous if n_c > 1 else False)
    return counts


def union_oracle(q, k, v, bq, bk, c, mask=None, causal=False, shared_qk=False, dedup=True, scale=None):
    """Dense softmax over the union of the windows (multiplicity-weighted without dedup).

    Shapes are (G, N, D) with buckets (R, G, N). Returns ``(out, counts, visible)``.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    G, N, D = q.shape
    scale = 1 / np.sqrt(D) if scale is None else scale
    counts = window_counts(np.asarray(bq), np.asarray(bk), c)                      # (G, N, N)
    visible = (counts > 0) & visible_matrix(N, N, mask, causal)
    keys = q / np.linalg.norm(q, axis=-1, keepdims=True) if shared_qk else k
    s = scale * np.einsum("gid,gjd->gij", q, keys)
    if shared_qk:
        s[:, np.arange(N), np.arange(N)] = -1e5
    if not dedup:
        s = s + np.log(np.maximum(counts, 1))
    s = np.where(visible, s, -np.inf)
    empty = ~visible.any(-1)
    with np.errstate(divide="ignore"):
        lse = logsumexp(s, axis=-1)
    w = np.where(empty[..., None], 0.0, np.exp(s - np.where(empty, 0.0, lse)[..., None]))
    return np.einsum("gij,gjd->gid", w, v), counts, visible


class TestReformer(BackendCase):
    METHOD = "reformer"
    BACKEND = "numpy"

    def buckets_of(self, info):
        return tuple(to_host(b) for b in info["buckets"])

    # --- the spec's oracles -------------------------------------------------------

    @pytest.mark.parametrize("num_hashes", [1, 3])
    @pytest.mark.parametrize("causal", [False, True])
    def test_one_bucket_and_one_chunk_equals_exact(self, num_hashes, causal):
        rng = np.random.default_rng(1)
        N = 6 if self.small else 20
        q, k, v = random_qkv(rng, batch=(2,), Nq=N, D=4, Dv=3)
        mask = rng.random((2, N)) > 0.3
        out = self.run(q, k, v, mask=mask, causal=causal, num_buckets=1, chunk_size=N + 3, num_hashes=num_hashes)
        assert_close(out, dense_attention(q, k, v, visible_matrix(N, N, mask, causal))[0], rel=1e-10)

    @pytest.mark.parametrize("N, c", [(9, 2), (12, 4), (10, 5)])
    def test_one_bucket_and_small_chunks_equal_exact_on_the_chunk_band(self, N, c):
        rng = np.random.default_rng(N)
        q, k, v = random_qkv(rng, batch=(2,), Nq=N, D=4, Dv=3)
        mask = rng.random((2, N)) > 0.2
        i, j = np.arange(N)[:, None] // c, np.arange(N)[None, :] // c
        n_c = -(-N // c)
        band = (j == i) | (j == (i - 1) % n_c)
        out = self.run(q, k, v, mask=mask, num_buckets=1, chunk_size=c, num_hashes=2)
        assert_close(out, dense_attention(q, k, v, band & mask[:, None, :])[0], rel=1e-10)

    def test_hash_of_the_hand_example(self):
        x = np.array([[[1.0, 0.5], [0.2, 0.9], [-1.0, 0.2], [0.1, -3.0]]])           # (1, 4, 2)
        rotations = np.eye(2)[None]                                                 # (1, 2, 2): R = I
        assert hash_buckets(x, rotations, 4).tolist() == [[[0, 1, 2, 3]]]
        v = np.ones((1, 4, 1))
        _, info = self.run(x, x, v, rotations=rotations, num_buckets=4, return_info=True)
        assert [b.tolist() for b in self.buckets_of(info)] == [[[[0, 1, 2, 3]]]] * 2

    @pytest.mark.parametrize("shared_qk", [False, True])
    @pytest.mark.parametrize("causal", [False, True])
    def test_dedup_equals_softmax_over_the_union_of_windows(self, shared_qk, causal, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        N, c = (7, 2) if self.small else (33, 4)
        q, k, v = random_qkv(rng, batch=(3,), Nq=N, D=6, Dv=4)
        k = q if shared_qk else k
        mask = rng.random((3, N)) > 0.2
        kw = dict(mask=mask, causal=causal, shared_qk=shared_qk, chunk_size=c, num_hashes=3, num_buckets=4)
        out, info = self.run(q, k, v, rng=global_random_seed, return_info=True, **kw)
        bq, bk = self.buckets_of(info)
        expected, counts, visible = union_oracle(q, k, v, bq, bk, c, mask, causal, shared_qk)
        assert_close(out, expected, rel=1e-10)
        assert info["keys_per_query"] == pytest.approx(visible.sum(-1).mean(), rel=1e-12)
        assert to_host(info["empty_rows"]).tolist() == (~visible.any(-1)).tolist()

    def test_without_dedup_keys_count_once_per_round(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        N, c = (7, 2) if self.small else (30, 3)
        q, k, v = random_qkv(rng, batch=(2,), Nq=N, D=5)
        out, info = self.run(q, k, v, rng=global_random_seed, dedup=False, chunk_size=c, num_hashes=4,
                             num_buckets=4, return_info=True)
        expected, counts, _ = union_oracle(q, k, v, *self.buckets_of(info), c, dedup=False)
        assert counts.max() > 1  # some pair is found in several rounds, so dedup matters here
        assert_close(out, expected, rel=1e-10)
        deduped = self.run(q, k, v, buckets=info["buckets"], num_buckets=4, chunk_size=c)
        assert relative_error(deduped, out) > 1e-3

    def test_copies_of_one_rotation_equal_one_round(self):
        rng = np.random.default_rng(2)
        N = 8 if self.small else 24
        q, k, v = random_qkv(rng, batch=(2,), Nq=N, D=4)
        one = draw_reformer_rotations(5, 1, 4, 4)                                   # (1, 4, 2)
        kw = dict(num_buckets=4, chunk_size=3)
        single = self.run(q, k, v, rotations=one, **kw)
        assert_close(self.run(q, k, v, rotations=np.repeat(one, 3, axis=0), **kw), single, rel=1e-12)

    def test_nested_rounds_never_lose_exact_softmax_mass(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        N, c = (8, 2) if self.small else (40, 4)
        q, k, v = random_qkv(rng, batch=(2,), Nq=N, D=8)
        rotations = draw_reformer_rotations(global_random_seed, 8, 8, 8)
        s = np.einsum("gid,gjd->gij", q, k) / np.sqrt(8)
        P = np.exp(s - logsumexp(s, axis=-1, keepdims=True))                          # exact attention rows
        masses, previous = [], None
        for r in range(1, 9):
            _, info = self.run(q, k, v, rotations=rotations[:r], num_buckets=8, chunk_size=c, return_info=True)
            union = window_counts(*self.buckets_of(info), c) > 0                      # (G, N, N)
            if previous is not None:
                assert (union | ~previous).all()  # the first r rounds of 8 are the r-round draw: nested
            masses.append((P * union).sum(-1).mean())
            previous = union
        assert all(b >= a - 1e-15 for a, b in zip(masses, masses[1:]))
        assert masses[-1] > masses[0]

    def test_causal_rows_ignore_the_future_with_fixed_buckets(self):
        rng = np.random.default_rng(4)
        N, t = (8, 4) if self.small else (24, 11)
        q, k, v = random_qkv(rng, batch=(2,), Nq=N, D=4)
        _, info = self.run(q, k, v, rng=0, causal=True, num_buckets=4, chunk_size=3, return_info=True)
        q2, k2, v2 = (a.copy() for a in (q, k, v))
        for a in (q2, k2, v2):
            a[:, t + 1:] = 10 * rng.standard_normal(a[:, t + 1:].shape)
        kw = dict(causal=True, buckets=info["buckets"], num_buckets=4, chunk_size=3)
        before = to_host(self.run(q, k, v, **kw))
        after = to_host(self.run(q2, k2, v2, **kw))
        assert_close(after[:, : t + 1], before[:, : t + 1], rel=1e-12)

    def test_shared_qk_single_token_returns_its_value(self):
        q = np.array([[0.3, -1.2, 2.0]])
        v = np.array([[4.0, 5.0]])
        out, info = self.run(q, q, v, shared_qk=True, rng=0, return_info=True)
        assert_close(out, v, rel=1e-12)
        assert to_host(info["self_only_rows"]).tolist() == [True]

    def test_shared_qk_attends_to_itself_only_as_a_last_resort(self):
        rng = np.random.default_rng(6)
        q, _, v = random_qkv(rng, batch=(1,), Nq=6, D=3)
        out, info = self.run(q, q, v, shared_qk=True, causal=True, num_buckets=1, chunk_size=6, return_info=True)
        out = to_host(out)
        assert_close(out[0, 0], v[0, 0], rel=1e-12)               # row 0 sees only itself
        keys = q[0] / np.linalg.norm(q[0], axis=-1, keepdims=True)
        s = q[0, 3] @ keys[:3].T / np.sqrt(3)                     # row 3: keys 0-2, never itself
        w = np.exp(s - s.max())
        assert_close(out[0, 3], w @ v[0, :3] / w.sum(), rel=1e-12)
        assert to_host(info["self_only_rows"]).tolist() == [[True] + [False] * 5]

    def test_default_bucket_counts_factorise_above_64(self):
        assert default_num_buckets(100, 64) == 2
        assert default_num_buckets(130, 64) == 4
        assert default_num_buckets(4096, 64) == 64
        assert default_num_buckets(8192, 64) == (12, 12)      # b = 128: b1 = 2 ceil(sqrt(128)/2) = 12
        assert default_num_buckets(2**16, 64) == (32, 32)     # b = 1024
        q, k, v = random_qkv(0, batch=(1,), Nq=20, D=4)
        _, info = self.run(q, k, v, rng=0, chunk_size=3, return_info=True)
        assert info["params"]["num_buckets"] == 8 and info["params"]["num_hashes"] == 4   # 2 ceil(20 / 6)

    # --- backward ---------------------------------------------------------------------

    @pytest.mark.parametrize("shared_qk, causal, dedup", [(False, False, True), (False, True, True),
                                                          (True, False, True), (True, True, False),
                                                          (False, False, False)])
    def test_backward_matches_central_differences_with_fixed_buckets(self, shared_qk, causal, dedup):
        rng = np.random.default_rng(11)
        N, c = 7, 2
        q, k, v = random_qkv(rng, batch=(2,), Nq=N, D=3, Dv=2)
        k = q if shared_qk else k
        mask = np.ones((2, N), dtype=bool)
        mask[0, 2] = mask[1, 5] = False
        dout = rng.standard_normal((2, N, 2))
        _, info = eff_attn.reformer_attention(q, k, v, rng=3, num_hashes=3, num_buckets=4, chunk_size=c,
                                              shared_qk=shared_qk, return_info=True)
        buckets = self.buckets_of(info)
        kw = dict(mask=mask, causal=causal, shared_qk=shared_qk, dedup=dedup, chunk_size=c, num_buckets=4)
        _, vjp = self.run_vjp(q, k, v, buckets=buckets, **kw)
        dq, dk, dv = (to_host(g) for g in vjp(self.xp_in(dout)))

        def f(a, b, c_):
            return union_oracle(a, a if shared_qk else b, c_, *buckets, c, mask, causal, shared_qk, dedup)[0]

        eq, ek, ev = finite_difference_vjp(f, [q, k, v], dout)
        if shared_qk:  # the keys are q / |q|: everything flows to dq
            assert (dk == 0).all()
        assert_close(dq, eq, rel=1e-7, what="dq")
        assert_close(dk, 0 * ek if shared_qk else ek, rel=1e-7, atol=1e-12, what="dk")
        assert_close(dv, ev, rel=1e-7, what="dv")

    # --- agreement and properties --------------------------------------------------

    @pytest.mark.parametrize("shared_qk", [False, True])
    def test_agrees_with_the_numpy_reference_at_fixed_buckets(self, shared_qk, global_random_seed, numpy_reference):
        rng = np.random.default_rng(global_random_seed)
        N, c = (7, 2) if self.small else (45, 4)
        q, k, v = random_qkv(rng, batch=(2, 2), Nq=N, D=8, Dv=5)
        k = q if shared_qk else k
        mask = rng.random((2, 1, N)) > 0.2
        _, info = numpy_reference.run(q, k, v, rng=global_random_seed, num_hashes=3, num_buckets=6, chunk_size=c,
                                      shared_qk=shared_qk, return_info=True)
        kw = dict(mask=mask, causal=True, shared_qk=shared_qk, chunk_size=c, num_buckets=6, buckets=info["buckets"])
        ref64 = to_host(numpy_reference.run(q, k, v, **kw))
        assert_close(self.run(q, k, v, **kw), ref64, rel=1e-10)
        q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
        out32 = self.run(q32, k32, v32, **kw)
        assert to_host(out32).dtype == np.float32
        numpy_error = relative_error(numpy_reference.run(q32, k32, v32, **kw), ref64)
        assert relative_error(out32, ref64) <= 2 * numpy_error + 1e-6

    def test_hashes_agree_with_the_numpy_backend(self, global_random_seed, numpy_reference):
        rng = np.random.default_rng(global_random_seed)
        N = 8 if self.small else 200
        q, k, v = random_qkv(rng, batch=(2,), Nq=N, D=16, dtype=np.float32)
        kw = dict(rng=global_random_seed, num_buckets=16, chunk_size=4, return_info=True)
        _, mine = self.run(q, k, v, **kw)
        _, ref = numpy_reference.run(q, k, v, **kw)
        for b, r in zip(self.buckets_of(mine), self.buckets_of(ref)):
            assert (b == r).mean() >= 0.999

    def test_property_shapes_masks_and_dtypes(self):
        @settings(max_examples=self.examples, deadline=None)
        @given(
            N=st.integers(1, 12), D=st.integers(1, 5), Dv=st.integers(1, 4),
            lead=st.sampled_from([(), (1,), (2,), (2, 3)]), masked=st.booleans(), causal=st.booleans(),
            shared_qk=st.booleans(), dedup=st.booleans(), chunk_size=st.integers(1, 5),
            num_hashes=st.integers(1, 3), num_buckets=st.sampled_from([1, 2, 4, (2, 4)]),
            dtype=st.sampled_from([np.float32, np.float64]), big=st.booleans(), seed=st.integers(0, 2**16),
        )
        def check(N, D, Dv, lead, masked, causal, shared_qk, dedup, chunk_size, num_hashes, num_buckets, dtype, big,
                  seed):
            rng = np.random.default_rng(seed)
            q, k, v = random_qkv(rng, batch=lead, Nq=N, D=D, Dv=Dv, scale=6.0 if big else 1.0)
            k = q if shared_qk else k
            mask = rng.random((*lead, N)) > 0.4 if masked else None
            out, info = self.run(*(a.astype(dtype) for a in (q, k, v)), mask=mask, causal=causal,
                                 shared_qk=shared_qk, dedup=dedup, chunk_size=chunk_size, num_hashes=num_hashes,
                                 num_buckets=num_buckets, rng=seed, return_info=True)
            out = to_host(out)
            assert out.dtype == dtype and out.shape == (*lead, N, Dv) and np.isfinite(out).all()
            G = int(np.prod(lead))
            bq, bk = (b.reshape(num_hashes, G, N) for b in self.buckets_of(info))
            flat = (q.reshape(G, N, D), k.reshape(G, N, D), v.reshape(G, N, Dv))
            keep = None if mask is None else mask.reshape(G, N)
            expected, _, _ = union_oracle(*flat, bq, bk, chunk_size, keep, causal, shared_qk, dedup)
            tol = 1e-10 if dtype == np.float64 else 1e-5 * (10 if big else 1)
            assert_close(out.reshape(G, N, Dv), expected, rel=tol)

        check()

    def test_info_has_the_base_keys_and_flops(self):
        q, k, v = random_qkv(0, batch=(2,), Nq=10, D=3, Dv=5)
        _, info = self.run(q, k, v, rng=1, num_hashes=2, num_buckets=4, chunk_size=4, return_info=True)
        assert info["method"] == "reformer" and info["backend"] == self.BACKEND
        assert {"params", "flops", "empty_rows", "buckets", "bucket_size_max", "keys_per_query",
                "self_only_rows"} <= set(info)
        bq, bk = self.buckets_of(info)
        assert bq.shape == bk.shape == (2, 2, 10)
        largest = max(np.bincount(b[r, g], minlength=4).max() for b in (bq, bk) for r in range(2) for g in range(2))
        assert info["bucket_size_max"] == largest
        pairs = 4 * (4 + 2) + 4 * (4 + 4) + 2 * (2 + 4)   # chunk sizes 4, 4, 2; window = own + previous
        per_slice = 2 * (2 * 10 * 3 * 4 + pairs * (2 * 3 + 2 * 5 + 5)) + 2 * 2 * pairs
        assert info["flops"] == 2 * per_slice

    # --- bad input ---------------------------------------------------------------------

    def test_bad_parameters_raise_clear_errors(self):
        q, k, v = random_qkv(0, batch=(1,), Nq=6, D=3)
        with pytest.raises(ValueError, match="num_buckets=5 must be 1 or even"):
            self.run(q, k, v, num_buckets=5)
        with pytest.raises(ValueError, match="tuple of even factors"):
            self.run(q, k, v, num_buckets=(4, 3))
        with pytest.raises(eff_attn.NotSupportedError, match="needs Nq == Nk"):
            self.run(q[:, :4], k, v)
        with pytest.raises(ValueError, match="shared_qk=True uses the queries as keys"):
            self.run(q, k, v, shared_qk=True)
        with pytest.raises(ValueError, match="replay a fixed draw"):
            self.run(q, k, v, rotations=draw_reformer_rotations(0, 4, 3, 2), num_buckets=2, rng=0)
        with pytest.raises(ValueError, match=r"rotations must have shape .* \(4, 3, 2\)"):
            self.run(q, k, v, rotations=np.ones((4, 3, 1)), num_buckets=4)
        with pytest.raises(ValueError, match="num_buckets=1 skips hashing"):
            self.run(q, k, v, rotations=np.ones((4, 3, 1)), num_buckets=1)
        with pytest.raises(ValueError, match="not both"):
            self.run(q, k, v, rotations=np.ones((4, 3, 1)), buckets=np.zeros((4, 6), int))
        with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
            self.run(q, k, v, buckets=np.full((4, 6), 2), num_buckets=2)
        with pytest.raises(TypeError, match="integer array"):
            self.run(q, k, v, buckets=np.zeros((4, 6)), num_buckets=2)
        with pytest.raises(ValueError, match="num_hashes=4"):
            self.run(q, k, v, buckets=np.zeros((3, 6), int), num_hashes=4, num_buckets=2)
        with pytest.raises(ValueError, match="chunk_size=0 is too small"):
            self.run(q, k, v, chunk_size=0)
        with pytest.raises(TypeError, match="dedup must be True or False"):
            self.run(q, k, v, dedup=1)

    def test_k_none_means_shared_qk(self):
        q, _, v = random_qkv(3, batch=(2,), Nq=5, D=3)
        out = eff_attn.reformer_attention(q, None, v, backend=self.BACKEND, shared_qk=True, rng=0)
        assert_close(out, self.run(q, q, v, shared_qk=True, rng=0), rel=0)
        with pytest.raises(TypeError, match="k is None"):
            eff_attn.reformer_attention(q, None, v, backend=self.BACKEND)


class TestReformerNumba(TestReformer):
    BACKEND = "numba"

    def test_backward_matches_central_differences_with_fixed_buckets(self, shared_qk=False, causal=False, dedup=True):
        q, k, v = random_qkv(0, batch=(1,), Nq=5, D=3)
        with pytest.raises(eff_attn.NotSupportedError, match="reformer/numba: has no backward pass"):
            self.run_vjp(q, k, v, rng=0)


@pytest.mark.gpu
class TestReformerCupy(TestReformer):
    BACKEND = "cupy"


@pytest.mark.cudasim
class TestReformerCupyEmulated(TestReformer):
    BACKEND = "cupy"
    EMULATED = True


def test_error_falls_with_more_rounds_on_clustered_keys():
    from eff_attn.bench.problems import clustered

    # Mean over 8 seeds of the relative Frobenius error against exact attention,
    # for the nested rounds 1, 2, 4, 8 of one draw: more rounds, larger unions.
    # Measured: 1.12, 0.63, 0.30, 0.11, with standard deviations below 0.08 over seeds.
    problem = clustered(256, d=32, heads=4, seed=0)
    exact = dense_attention(problem.q, problem.k, problem.v, True)[0]
    errors = {r: [] for r in (1, 2, 4, 8)}
    for seed in range(8):
        rotations = draw_reformer_rotations(seed, 8, 32, default_num_buckets(256, 32))
        for r in errors:
            out = eff_attn.reformer_attention(problem.q, problem.k, problem.v, backend="numpy", chunk_size=32,
                                              rotations=rotations[:r])
            errors[r].append(np.linalg.norm(out - exact) / np.linalg.norm(exact))
    means = [np.mean(errors[r]) for r in (1, 2, 4, 8)]
    assert means[0] > means[1] > means[2] > means[3]
    assert means[3] < 0.5 * means[0]


def test_flops_follow_the_documented_count():
    from eff_attn.methods.reformer import flops, window_pairs

    assert window_pairs(10, 4) == 4 * 6 + 4 * 8 + 2 * 6
    assert window_pairs(5, 8) == 25
    N, D, Dv, R, c, b = 256, 16, 8, 4, 32, 8
    pairs = window_pairs(N, c)
    forward = R * (2 * N * D * b + pairs * (2 * D + 2 * Dv + 5)) + R * R * pairs
    assert flops(N, N, D, Dv, num_hashes=R, num_buckets=b, chunk_size=c) == forward
    assert flops(N, N, D, Dv, num_hashes=R, num_buckets=b, chunk_size=c, shared_qk=True, dedup=False) == (
        R * (N * D * b + pairs * (2 * D + 2 * Dv + 5)))
    assert flops(N, N, D, Dv, num_hashes=R, num_buckets=b, chunk_size=c, backward=True) == (
        forward + R * pairs * (6 * D + 4 * Dv + 5))


@pytest.mark.parametrize("num_buckets, flip", [(8, lambda h: (h + 4) % 8),
                                               ((4, 6), lambda h: (h % 4 + 2) % 4 + 4 * ((h // 4 + 3) % 6))])
def test_hash_is_scale_invariant_and_antipodes_shift_by_half(num_buckets, flip):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50, 16))
    rotations = draw_reformer_rotations(1, 2, 16, num_buckets)
    h = hash_buckets(x, rotations, num_buckets)
    assert (hash_buckets(3.7 * x, rotations, num_buckets) == h).all()
    assert (hash_buckets(-x, rotations, num_buckets) == flip(h)).all()


def test_collision_rate_falls_with_the_angle():
    # 2000 draws, D=16, b=8. Collisions at angle 0 are certain and at pi impossible
    # (h(-x) = h(x) + b/2); in between, the standard error of a rate is <= 0.011,
    # and the measured rates (about 0.38 at pi/4, 0.10 at pi/2) are far apart.
    rotations = draw_reformer_rotations(0, 2000, 16, 8)                         # (2000, 16, 4)
    e0, e1 = np.eye(16)[0], np.eye(16)[1]
    angles = [0, np.pi / 4, np.pi / 2, np.pi]
    x = np.stack([e0] + [np.cos(a) * e0 + np.sin(a) * e1 for a in angles])[None]  # (1, 5, 16)
    h = hash_buckets(x, rotations, 8)[:, 0]                                     # (2000, 5)
    rates = [(h[:, 0] == h[:, 1 + t]).mean() for t in range(4)]
    assert rates[0] == 1.0 and rates[3] == 0.0
    assert rates[0] > rates[1] > rates[2] > rates[3]
    assert rates[1] - rates[2] > 0.1


def test_two_buckets_collide_with_probability_one_minus_angle_over_pi():
    # b = 2 is one hyperplane: h(x) = h(y) iff sign(x.r) = sign(y.r), probability
    # 1 - theta/pi. 4000 draws: within 4 standard errors at every angle.
    draws = 4000
    rotations = draw_reformer_rotations(3, draws, 8, 2)
    angles = np.array([0.3, 1.0, 2.0, 2.8])
    e0, e1 = np.eye(8)[0], np.eye(8)[1]
    x = np.stack([e0] + [np.cos(a) * e0 + np.sin(a) * e1 for a in angles])[None]
    h = hash_buckets(x, rotations, 2)[:, 0]
    rates = (h[:, 1:] == h[:, :1]).mean(axis=0)
    expected = 1 - angles / np.pi
    assert (np.abs(rates - expected) <= 4 * np.sqrt(expected * (1 - expected) / draws)).all()


def test_draws_are_nested_in_the_number_of_rounds():
    eight = draw_reformer_rotations(7, 8, 5, (4, 6))
    assert eight.shape == (8, 5, 5)
    assert (draw_reformer_rotations(7, 3, 5, (4, 6)) == eight[:3]).all()
