"""Tests of ``uniform``: the mean of the visible values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eff_attn.testing import assert_close, finite_difference_vjp, random_qkv, to_host
from tests._harness import BackendCase
from tests._oracles import dense_attention, visible_matrix

CAUSAL_MODES = [False, True, "top_left"]


def mean_of_visible(v, visible):
    """Independent oracle: average v over each row's visible keys (0 if none)."""
    w = np.broadcast_to(visible, (*v.shape[:-2], visible.shape[-2], v.shape[-2])).astype(float)
    counts = w.sum(-1, keepdims=True)
    return np.where(counts > 0, (w @ v) / np.maximum(counts, 1), 0.0)


class TestUniform(BackendCase):
    METHOD = "uniform"

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_equals_exact_attention_with_zero_queries(self, causal):
        rng = np.random.default_rng(0)
        _, k, v = random_qkv(rng, batch=(2,), Nq=5, Nk=7)
        q = np.zeros((2, 5, 4))
        mask = rng.random((2, 7)) > 0.3
        exact, _ = dense_attention(q, k, v, visible_matrix(5, 7, mask, causal))
        assert_close(self.run(q, k, v, mask=mask, causal=causal), exact, rel=1e-12)

    def test_hand_example(self):
        v = np.array([[1.0], [2.0], [6.0]])
        q = k = np.zeros((3, 1))
        assert_close(self.run(q, k, v), [[3.0]] * 3, rel=1e-12)
        assert_close(self.run(q, k, v, causal=True), [[1.0], [1.5], [3.0]], rel=1e-12)

    def test_fully_masked_rows_are_zero(self):
        q, k, v = random_qkv(1, batch=(2,), Nq=3, Nk=4)
        mask = np.array([[False] * 4, [True, False, False, True]])
        out = to_host(self.run(q, k, v, mask=mask))
        assert (out[0] == 0).all()
        assert_close(out[1], np.broadcast_to((v[1, 0] + v[1, 3]) / 2, (3, 4)), rel=1e-12)

    @pytest.mark.parametrize("causal", CAUSAL_MODES)
    def test_backward_matches_central_differences(self, causal):
        rng = np.random.default_rng(2)
        q, k, v = random_qkv(rng, batch=(2,), Nq=4, Nk=5, D=2, Dv=3)
        mask = rng.random((2, 5)) > 0.3
        dout = rng.standard_normal((2, 4, 3))
        _, vjp = self.run_vjp(q, k, v, mask=mask, causal=causal)
        grads = vjp(self.xp_in(dout))
        vis = visible_matrix(4, 5, mask, causal)
        expected = finite_difference_vjp(lambda a, b, c: mean_of_visible(c, vis), [q, k, v], dout)
        for name, g, e in zip("qkv", grads, expected):
            assert_close(g, e, rel=1e-7, atol=1e-12, what=f"d{name}")

    def test_property_shapes_masks_and_dtypes(self):
        @settings(max_examples=self.examples, deadline=None)
        @given(Nq=st.integers(1, 9), Nk=st.integers(1, 9), lead=st.sampled_from([(), (2,), (2, 3)]),
               causal=st.sampled_from(CAUSAL_MODES), masked=st.booleans(),
               dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
        def check(Nq, Nk, lead, causal, masked, dtype, seed):
            rng = np.random.default_rng(seed)
            q, k, v = random_qkv(rng, batch=lead, Nq=Nq, Nk=Nk, D=2, Dv=3)
            mask = rng.random((*lead, Nk)) > 0.4 if masked else None
            expected = mean_of_visible(v, visible_matrix(Nq, Nk, mask, causal))
            out = self.run(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask, causal=causal)
            assert_close(out, expected, rel=1e-12 if dtype == np.float64 else 1e-6)

        check()


class TestUniformNumba(TestUniform):
    BACKEND = "numba"


@pytest.mark.gpu
class TestUniformCupy(TestUniform):
    BACKEND = "cupy"


@pytest.mark.cudasim
class TestUniformCupyEmulated(TestUniform):
    BACKEND = "cupy"
    EMULATED = True
