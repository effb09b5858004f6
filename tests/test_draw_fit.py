"""``Method.draw`` reads only shapes; everything that reads the data is a declared ``Method.fit``.

For every registered method and a range of its parameters, the draw is run on
the real inputs and on stand-ins of the same shapes whose values are NaN (and
whose mask is flipped): the results must be equal. When the call does not
fit (``Method.fits`` is false), the whole of what the backend receives must be
equal too, so any dependence on the data is declared.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

import eff_attn
from eff_attn import registry
from eff_attn._dispatch import resolve_params
from eff_attn._validate import check_inputs
from eff_attn.methods.routing import init_centroids
from eff_attn.methods.treeformer import init_tree_pca
from eff_attn.registry import Impl, Method
from eff_attn.testing import random_qkv

SHAPE = dict(batch=(2, 2), Nq=24, Nk=24, D=4, Dv=3)


def _inputs(seed):
    q, k, v = random_qkv(seed, **SHAPE)
    mask = np.random.default_rng(seed + 100).random((*SHAPE["batch"], SHAPE["Nk"])) < 0.8
    mask[..., 0] = True
    return q, k, v, mask


def _stand_in(problem, causal):
    """``problem`` with the same shapes and other values: NaN inputs, the mask flipped (one key kept)."""
    lead = problem.batch_shape
    nan = {name: np.full((*lead, *getattr(problem, name).shape[1:]), np.nan) for name in ("q", "k", "v")}
    mask = ~problem.unflatten(problem.mask)
    mask[..., -1] = True
    return check_inputs(nan["q"], nan["k"], nan["v"], mask=mask, causal=causal, scale=problem.scale,
                        check_finite=False)


def _same(a, b) -> bool:
    """Equal values, recursively through dicts, sequences, dataclasses and objects (NaN equals NaN)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if hasattr(a, "__dict__") and not callable(a):
        return _same(vars(a), vars(b))
    return a == b


def _given_states(q, k, mask):
    """Parameter sets that pass a state fitted elsewhere (the draw binds it, nothing is fitted)."""
    routing_state = init_centroids(q, k, num_clusters=4, mask=mask, rng=1)
    tree = init_tree_pca(q, k, 2, mask=mask, tree_shape=SHAPE["batch"])
    return {"routing": [{"state": routing_state}],
            "treeformer_tf": [{"state": tree}, {"tree_init": "random", "height": 2}],
            "treeformer_tc": [{"state": tree}, {"tree_init": "random", "height": 2}]}


def _param_sets(name, q, k, mask):
    m = registry.get_method(name)
    sets = [{}, dict(m.compare_defaults), *m.sweep(SHAPE["Nk"]), *_given_states(q, k, mask).get(name, [])]
    unique = []
    for params in sets:
        if not any(_same(params, seen) for seen in unique):
            unique.append(params)
    return unique


def _cases():
    q, k, v, mask = _inputs(0)
    for name in registry.method_names(builtin_only=True):
        for i, params in enumerate(_param_sets(name, q, k, mask)):
            for causal in (False, True):
                yield pytest.param(name, params, causal, id=f"{name}-{i}-{'causal' if causal else 'full'}")


def _resolved(name, params, causal, seed=0):
    q, k, v, mask = _inputs(seed)
    problem = check_inputs(q, k, v, mask=mask, causal=causal)
    m = registry.get_method(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return m, problem, resolve_params(m, problem, params)
    except (ValueError, TypeError):               # not valid here (NotSupportedError is a ValueError)
        pytest.skip(f"{name} refuses the parameters {sorted(params)} with causal={causal}")


def _rng(params):
    """A seed, or None with a given state (which makes ``rng`` an error)."""
    return None if "state" in params and not isinstance(params["state"], str) else 3


@pytest.mark.parametrize("name, params, causal", list(_cases()))
def test_draw_reads_only_shapes_and_every_data_dependence_is_a_declared_fit(name, params, causal):
    m, problem, resolved = _resolved(name, params, causal)
    blank = _stand_in(problem, causal)
    rng = _rng(params)
    if m.draw is not None:
        assert _same(m.draw(rng, problem, resolved), m.draw(rng, blank, resolved))
    if not m.fits(problem, resolved):
        assert _same(m.draw_and_fit(rng, problem, resolved), m.draw_and_fit(rng, blank, resolved))


@pytest.mark.parametrize("name, params", [
    ("routing", {}),
    ("treeformer_tf", {"height": 2}),
    ("treeformer_tc", {"tree_init": "random", "height": 2}),
    ("treeformer_tf", {"tree_init": "fit", "height": 2}),
    ("sparsefinder", {"state": "fit", "predictor": "kmeans"}),
    ("sparsefinder", {"state": "fit", "predictor": "distance"}),
])
def test_a_state_fitted_on_the_call_is_a_fit_and_follows_the_data(name, params):
    m, problem, resolved = _resolved(name, params, False)
    _, other, _ = _resolved(name, params, False, seed=1)
    assert m.fits(problem, resolved)
    first, second = (m.draw_and_fit(3, p, resolved) for p in (problem, other))
    assert first.keys() == second.keys()
    assert not _same(first, second)                       # the state changes with the data, at one seed


def test_a_given_state_is_not_fitted():
    q, k, v, mask = _inputs(0)
    problem = check_inputs(q, k, v, mask=mask)
    for name, sets in _given_states(q, k, mask).items():
        m = registry.get_method(name)
        resolved = resolve_params(m, problem, sets[0])
        assert not m.fits(problem, resolved)


def test_methods_that_fit_take_an_rng_and_deterministic_ones_do_not():
    for name in registry.method_names(builtin_only=True):
        m = registry.get_method(name)
        assert m.randomized == (m.draw is not None or m.fit is not None)
    assert registry.get_method("sparsefinder").randomized              # a fit only: k-means++ and sampling
    assert not registry.get_method("exact").randomized


def _noise_forward(q, k, v, *, mask, offset, scale, a, b, **params):
    out = np.zeros((q.shape[0], q.shape[1], v.shape[-1])) + a.sum() + b.sum()
    return out, {}


def test_the_fit_continues_the_draws_stream_and_sees_its_entries():
    seen = {}

    def fit(rng, problem, params):
        seen.update(params)
        return {"b": rng.standard_normal(3)}

    exact = registry.get_method("exact")
    method = Method(name="draw_then_fit", summary="test", resolve=lambda problem: {}, flops=exact.flops,
                    impls=(Impl("numpy", type("M", (), {"forward": staticmethod(_noise_forward)})),),
                    draw=lambda rng, problem, params: {"a": rng.standard_normal(2)}, fit=fit)
    q, k, v, _ = _inputs(0)
    problem = check_inputs(q, k, v)
    kwargs = method.draw_and_fit(5, problem, {})
    g = np.random.default_rng(5)                                        # one stream: draw first, then fit
    expected_a, expected_b = g.standard_normal(2), g.standard_normal(3)
    assert np.array_equal(kwargs["a"], expected_a) and np.array_equal(kwargs["b"], expected_b)
    assert np.array_equal(seen["a"], expected_a)
    registry.register(method)
    try:
        out = eff_attn.attention(q, k, v, method="draw_then_fit", rng=5)
    finally:
        registry.unregister("draw_then_fit")
    assert np.allclose(out, expected_a.sum() + expected_b.sum())
