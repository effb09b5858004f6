"""Tests of ``topk_oracle``: exact softmax over each query's true top-k keys."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eff_attn
from eff_attn.testing import assert_close, finite_difference_vjp, random_qkv, to_host
from tests._harness import BackendCase
from tests._oracles import dense_attention, visible_matrix

CAUSAL_MODES = [False, True, "top_left"]


def topk_visible(q, k, topk, visible, scale):
    """Independent oracle of the kept set: per row, sort (-score, index) in Python."""
    s = scale * np.einsum("...id,...jd->...ij", q, k)
    vis = np.broadcast_to(visible, s.shape)
    keep = np.zeros(s.shape, dtype=bool)
    for idx in np.ndindex(s.shape[:-1]):
        ranked = sorted((j for j in range(s.shape[-1]) if vis[idx][j]), key=lambda j: (-s[idx][j], j))
        keep[idx][ranked[:topk]] = True
    return keep


class TestTopkOracle(BackendCase):
    METHOD = "topk_oracle"

    def test_hand_example_keeps_the_two_largest_scores(self):
        q = np.array([[1.0]])
        k = np.array([[3.0], [1.0], [2.0]])
        v = np.eye(3)
        out, info = self.run(q, k, v, scale=1.0, topk=2, return_info=True)
        assert_close(out, [[0.7310586, 0.0, 0.2689414]], rel=1e-6)
        assert to_host(info["support"]).tolist() == [[0, 2]]

    def test_ties_keep_the_lower_index(self):
        q = np.array([[1.0]])
        k = np.array([[1.0], [2.0], [1.0], [2.0]])
        _, info = self.run(q, k, np.eye(4), scale=1.0, topk=3, return_info=True)
        assert to_host(info["support"]).tolist() == [[1, 3, 0]]

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_k_at_least_nk_equals_exact(self, causal):
        rng = np.random.default_rng(0)
        q, k, v = random_qkv(rng, batch=(2,), Nq=4, Nk=6)
        mask = rng.random((2, 6)) > 0.3
        exact, _ = dense_attention(q, k, v, visible_matrix(4, 6, mask, causal))
        out, info = self.run(q, k, v, mask=mask, causal=causal, topk=6, return_info=True)
        assert_close(out, exact, rel=1e-12)
        assert_close(info["mass_kept"], np.where(to_host(info["empty_rows"]), 0.0, 1.0), rel=1e-12)

    def test_matches_the_independent_oracle_and_mass_grows_with_k(self, global_random_seed):
        rng = np.random.default_rng(global_random_seed)
        Nq, Nk = (3, 6) if self.small else (9, 20)
        q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=3, scale=2.0)
        mask = rng.random((2, Nk)) > 0.2
        masses = []
        for topk in (1, 3, 5):
            keep = topk_visible(q, k, topk, visible_matrix(Nq, Nk, mask, True), 1 / np.sqrt(3))
            expected, _ = dense_attention(q, k, v, keep)
            out, info = self.run(q, k, v, mask=mask, causal=True, topk=topk, return_info=True)
            assert_close(out, expected, rel=1e-12)
            masses.append(to_host(info["mass_kept"]))
        assert (np.diff(np.stack(masses), axis=0) >= -1e-12).all()

    def test_property_shapes_masks_and_dtypes(self):
        @settings(max_examples=self.examples, deadline=None)
        @given(Nq=st.integers(1, 7), Nk=st.integers(1, 7), topk=st.integers(1, 8),
               causal=st.sampled_from(CAUSAL_MODES), masked=st.booleans(),
               dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
        def check(Nq, Nk, topk, causal, masked, dtype, seed):
            rng = np.random.default_rng(seed)
            q, k, v = random_qkv(rng, batch=(2,), Nq=Nq, Nk=Nk, D=2)
            mask = rng.random((2, Nk)) > 0.4 if masked else None
            keep = topk_visible(q.astype(dtype), k.astype(dtype), topk, visible_matrix(Nq, Nk, mask, causal),
                                dtype(1 / np.sqrt(2)))
            expected, _ = dense_attention(q, k, v, keep)
            out = self.run(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask, causal=causal, topk=topk)
            assert_close(out, expected, rel=1e-12 if dtype == np.float64 else 1e-5)

        check()

    def test_bad_topk_is_refused(self):
        q, k, v = random_qkv(0)
        with pytest.raises(ValueError, match=r"topk=0 is too small"):
            self.run(q, k, v, topk=0)


class TestTopkOracleNumba(TestTopkOracle):
    BACKEND = "numba"


@pytest.mark.gpu
class TestTopkOracleCupy(TestTopkOracle):
    BACKEND = "cupy"


@pytest.mark.cudasim
class TestTopkOracleCupyEmulated(TestTopkOracle):
    BACKEND = "cupy"
    EMULATED = True


def test_backward_with_the_support_fixed_matches_central_differences():
    rng = np.random.default_rng(4)
    q, k, v = random_qkv(rng, batch=(2,), Nq=3, Nk=6, D=2, scale=2.0)
    dout = rng.standard_normal((2, 3, 2))
    _, vjp, info = eff_attn.attention_vjp(q, k, v, method="topk_oracle", topk=3, return_info=True,
                                          backend="numpy")
    keep = np.zeros((2, 3, 6), dtype=bool)
    np.put_along_axis(keep, info["support"], True, axis=-1)
    expected = finite_difference_vjp(lambda a, b, c: dense_attention(a, b, c, keep)[0], [q, k, v], dout)
    for name, g, e in zip("qkv", vjp(dout), expected):
        assert_close(g, e, rel=1e-7, what=f"d{name}")


@pytest.mark.parametrize("backend", ["numba"])
def test_host_kernels_have_no_backward(backend):
    pytest.importorskip(backend)
    with pytest.raises(eff_attn.NotSupportedError, match=r"topk_oracle/numba: has no backward pass"):
        eff_attn.attention_vjp(*random_qkv(0), method="topk_oracle", backend=backend)
