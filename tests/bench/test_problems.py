"""Tests of the benchmark input regimes, and of the shipped real attention heads.

The real heads are checked against properties that iid noise does not have:
low-entropy (peaked) attention rows, and layer-0 heads that agree across
sequence lengths on the shared prefix of a text.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
from scipy.special import softmax

from eff_attn.bench import problems
from eff_attn.metrics import row_entropy

LENGTHS = (128, 256, 512)
HEAD_DIM = 32


def _data_path():
    return resources.files("eff_attn.bench").joinpath("data", problems.REAL_HEADS_FILE)


@pytest.fixture(scope="module")
def stored():
    """The raw file contents, loaded once."""
    with _data_path().open("rb") as fh, np.load(fh) as data:
        return {name: data[name] for name in data.files}


def mean_row_entropy(q, k):
    """Mean entropy of the rows of softmax(q k^T / sqrt(D)), per head: shape (...)."""
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    return row_entropy(softmax(scores, axis=-1)).mean(-1)


# --- the file ---------------------------------------------------------------------------------


def test_file_is_installed_and_small():
    path = _data_path()
    assert path.is_file()
    with resources.as_file(path) as p:
        assert p.stat().st_size <= 4_000_000


def test_file_layout(stored):
    assert stored["lengths"].tolist() == list(LENGTHS)
    assert "all-MiniLM-L6-v2" in str(stored["model"])
    layers_heads = stored["layers_heads"]
    heads = layers_heads.shape[0]
    assert layers_heads.shape == (heads, 2) and heads >= 8
    assert ((0 <= layers_heads[:, 0]) & (layers_heads[:, 0] < 6)).all()
    assert ((0 <= layers_heads[:, 1]) & (layers_heads[:, 1] < 12)).all()
    assert len({tuple(p) for p in layers_heads.tolist()}) == heads
    texts = stored["texts"].shape[0]
    assert texts >= 2
    for n in LENGTHS:
        for name in "qkv":
            a = stored[f"{name}_{n}"]
            assert a.shape == (texts, heads, n, HEAD_DIM)
            assert a.dtype == np.float16
            assert np.isfinite(a).all()


# --- the loader -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
def test_loader_shapes_and_dtype(stored, n):
    texts, heads = stored["texts"].shape[0], stored["layers_heads"].shape[0]
    p = problems.real_heads(n)
    assert p.name == "real"
    for a in (p.q, p.k, p.v):
        assert a.shape == (texts * heads, n, HEAD_DIM)
        assert a.dtype == np.float64
    assert p.meta["layers_heads"] == stored["layers_heads"].tolist()
    assert p.meta["source_length"] == n
    # text-major flattening: the second text's heads follow the first's
    np.testing.assert_array_equal(problems.real_heads(n, text=1).k, p.k[heads : 2 * heads])
    np.testing.assert_array_equal(p.v[heads], stored[f"v_{n}"][1, 0].astype(np.float64))
    assert problems.real_heads(n, max_heads=5).q.shape == (5, n, HEAD_DIM)


@pytest.mark.parametrize("n, source", [(1, 128), (32, 128), (128, 128), (129, 256), (300, 512)])
def test_loader_crops_the_shortest_longer_pass(stored, n, source):
    p = problems.real_heads(n, text=1, max_heads=3)
    assert p.shape == (3, n, HEAD_DIM)
    assert p.meta["source_length"] == source
    np.testing.assert_array_equal(p.q, stored[f"q_{source}"][1, :3, :n].astype(np.float64))


@pytest.mark.parametrize("n", [0, 513])
def test_loader_rejects_a_length_beyond_the_file(n):
    with pytest.raises(ValueError, match=rf"real heads come at lengths \[128, 256, 512\] or crops .*not n={n}"):
        problems.real_heads(n)


# --- the real heads are not noise -------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
def test_real_rows_are_much_more_peaked_than_gaussian(n):
    p = problems.real_heads(n)
    rng = np.random.default_rng(0)
    real = mean_row_entropy(p.q, p.k)                                             # (heads,)
    noise = mean_row_entropy(rng.standard_normal(p.q.shape), rng.standard_normal(p.k.shape))
    # iid N(0, 1) scores q.k / sqrt(D) are about N(0, 1): rows near uniform, entropy near log n - 1/2
    assert noise.min() > np.log(n) - 1.0
    assert real.mean() < 0.7 * noise.mean()
    assert real.min() < 1.0            # some head puts almost all its weight on one key


def test_real_rows_are_more_peaked_than_scale_matched_gaussian():
    # Noise with each head's own q and k standard deviations, so that the scale alone cannot explain it.
    p = problems.real_heads(128)
    rng = np.random.default_rng(1)
    sq = p.q.std(axis=(-2, -1), keepdims=True)
    sk = p.k.std(axis=(-2, -1), keepdims=True)
    matched = mean_row_entropy(sq * rng.standard_normal(p.q.shape), sk * rng.standard_normal(p.k.shape))
    real = mean_row_entropy(p.q, p.k)
    assert real.mean() < matched.mean() - 0.5
    assert (real < matched).mean() >= 0.9


def test_layer_zero_heads_agree_across_lengths_on_the_shared_prefix(stored):
    # Layer 0 projects the embeddings of token + position; the first n-1 tokens of a text are the
    # same at every length (the last is [SEP]), so their layer-0 q, k, v must be the same too.
    layer0 = np.flatnonzero(stored["layers_heads"][:, 0] == 0)
    assert layer0.size > 0
    for name in "qkv":
        short = stored[f"{name}_128"][:, layer0, :127].astype(np.float64)
        for n in (256, 512):
            long = stored[f"{name}_{n}"][:, layer0, :127].astype(np.float64)
            np.testing.assert_allclose(long, short, rtol=2e-3, atol=2e-3)
        # ...while the [SEP] at position 127 differs from the word piece there in the longer samples
        assert not np.allclose(stored[f"{name}_128"][:, layer0, 127], stored[f"{name}_256"][:, layer0, 127], atol=1e-2)


# --- all regimes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gaussian", "clustered", "peaked"])
def test_synthetic_regimes_have_the_documented_shapes(name):
    p = problems.make_problem(name, n=96, d=16, heads=3, seed=5)
    assert p.name == name
    for a in (p.q, p.k, p.v):
        assert a.shape == (3, 96, 16)
        assert a.dtype == np.float64
    again = problems.make_problem(name, n=96, d=16, heads=3, seed=5)
    np.testing.assert_array_equal(again.q, p.q)


def test_real_regime_through_make_problem():
    p = problems.make_problem("real", n=256, heads=8)
    assert p.shape == (8, 256, HEAD_DIM)
    assert all(a.dtype == np.float64 for a in (p.q, p.k, p.v))


def test_make_problem_rejects_an_unknown_regime():
    with pytest.raises(ValueError, match="problem='noise' is not one of gaussian, clustered, peaked, real"):
        problems.make_problem("noise", n=8)


def test_every_regime_is_registered():
    assert set(problems.REGIMES) == {"gaussian", "clustered", "peaked", "real"}
