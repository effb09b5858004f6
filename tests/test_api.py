"""The one API: dispatch, capability errors, bad input, info and import hygiene."""

from __future__ import annotations

import numpy as np
import pytest

import eff_attn
from eff_attn import registry
from eff_attn.testing import assert_close, random_qkv


@pytest.fixture
def qkv():
    return random_qkv(0, batch=(2,), Nq=4, Nk=6, D=3, Dv=2)


# --- bad input: every case names the argument ------------------------------------------

def test_wrong_rank_names_the_argument(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"q must have shape \(\.\.\., N, D\).*got shape \(3,\)"):
        eff_attn.attention(np.ones(3), k, v)


def test_mismatched_feature_size_is_refused(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"k has D=5 features but q has D=3"):
        eff_attn.attention(q, np.ones((2, 6, 5)), v)


def test_mismatched_key_count_is_refused(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"v has Nk=5 rows but k has Nk=6"):
        eff_attn.attention(q, k, v[:, :5])


def test_integer_dtype_is_refused(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"q must be a float32 or float64 array, got dtype int64"):
        eff_attn.attention(q.astype(np.int64), k, v)


def test_mixed_dtypes_are_refused(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"share one dtype; q is float32, k is float64"):
        eff_attn.attention(q.astype(np.float32), k, v)


def test_half_precision_is_refused_with_a_cast_hint(qkv):
    q, k, v = qkv
    with pytest.raises(eff_attn.NotSupportedError, match=r"float16.*Cast it first"):
        eff_attn.attention(*(a.astype(np.float16) for a in (q, k, v)))


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_nan_input_is_refused_with_its_position(qkv, name):
    arrays = dict(zip("qkv", (a.copy() for a in qkv)))
    arrays[name][1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=rf"{name} contains NaN or inf .*{name}\(1, 2, 0\)"):
        eff_attn.attention(arrays["q"], arrays["k"], arrays["v"])


def test_nan_in_a_masked_key_row_is_allowed_and_has_no_effect(qkv):
    q, k, v = (a.copy() for a in qkv)
    mask = np.ones((2, 6), dtype=bool)
    mask[0, 3] = False
    clean = eff_attn.attention(q, k, v, mask=mask)
    k[0, 3] = np.nan
    v[0, 3] = np.inf
    assert_close(eff_attn.attention(q, k, v, mask=mask), clean, rel=0)


def test_check_finite_false_propagates(qkv):
    q, k, v = (a.copy() for a in qkv)
    q[0, 0, 0] = np.nan
    out = eff_attn.attention(q, k, v, check_finite=False)
    assert np.isnan(out[0, 0]).all() and np.isfinite(out[1]).all()


def test_wrong_mask_shape_is_refused(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"mask must have shape \(\.\.\., Nk\) with Nk=6, got shape \(2, 5\)"):
        eff_attn.attention(q, k, v, mask=np.ones((2, 5), dtype=bool))


def test_non_boolean_mask_is_refused(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"mask must be a boolean keep-mask .* got dtype float64"):
        eff_attn.attention(q, k, v, mask=np.ones((2, 6)))


def test_unbroadcastable_leading_axes_are_refused(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"leading \(batch, head\) axes do not broadcast"):
        eff_attn.attention(q, np.ones((3, 6, 3)), np.ones((3, 6, 2)))


def test_unknown_method_lists_the_known_ones(qkv):
    with pytest.raises(ValueError, match=r"method='flash' is not a known method; choose one of: exact"):
        eff_attn.attention(*qkv, method="flash")


def test_unknown_backend_is_refused(qkv):
    with pytest.raises(ValueError, match=r"backend='tpu' is not one of 'auto', 'numpy', 'numba', 'cupy'"):
        eff_attn.attention(*qkv, backend="tpu")


def test_unknown_parameter_lists_the_method_parameters(qkv):
    with pytest.raises(TypeError, match=r"method 'exact' has no parameter 'window'; its parameters are: algorithm"):
        eff_attn.attention(*qkv, window=3)


def test_bad_parameter_value_is_a_value_error(qkv):
    with pytest.raises(ValueError, match=r"block_q=0 is too small"):
        eff_attn.attention(*qkv, algorithm="blocked", block_q=0)
    with pytest.raises(ValueError, match=r"algorithm='fast' is not one of"):
        eff_attn.attention(*qkv, algorithm="fast")


def test_bad_causal_value_is_refused(qkv):
    with pytest.raises(ValueError, match=r"causal='yes' is not valid"):
        eff_attn.attention(*qkv, causal="yes")


def test_bad_scale_is_refused(qkv):
    with pytest.raises(ValueError, match=r"scale must be finite"):
        eff_attn.attention(*qkv, scale=float("inf"))
    with pytest.raises(TypeError, match=r"scale must be a real number"):
        eff_attn.attention(*qkv, scale="0.5")


def test_explicit_cupy_backend_without_a_gpu_lists_every_candidate(qkv):
    with pytest.raises(eff_attn.NotSupportedError) as err:
        eff_attn.attention(*qkv, backend="cupy")
    message = str(err.value)
    assert "exact/cupy:" in message and "inputs are host (NumPy) arrays" in message
    assert "exact/numpy: would run" in message


def test_not_installed_backend_is_reported(monkeypatch, qkv):
    from eff_attn import _backend

    monkeypatch.setattr(_backend, "_numba_status", lambda: (False, "numba not installed (pip install 'eff_attn[numba]')"))
    with pytest.raises(eff_attn.NotSupportedError, match=r"exact/numba: numba not installed"):
        eff_attn.attention(*qkv, backend="numba")
    # auto falls back to NumPy
    assert eff_attn.attention(*qkv).shape == (2, 4, 2)


def test_rng_must_be_a_seed_or_generator():
    from eff_attn.random import as_generator

    assert isinstance(as_generator(3), np.random.Generator)
    gen = np.random.default_rng(1)
    assert as_generator(gen) is gen
    with pytest.raises(TypeError, match=r"rng must be None, an int seed or a numpy.random.Generator"):
        as_generator(np.random.RandomState(0))
    with pytest.raises(ValueError, match=r"non-negative"):
        as_generator(-1)


def test_vjp_rejects_a_cotangent_of_the_wrong_shape(qkv):
    _, vjp = eff_attn.attention_vjp(*qkv)
    with pytest.raises(ValueError, match=r"dout must have the output's shape \(2, 4, 2\)"):
        vjp(np.ones((2, 4, 3)))


# --- dispatch ----------------------------------------------------------------------------

def test_auto_uses_numpy_for_small_problems(qkv):
    _, info = eff_attn.attention(*qkv, return_info=True)
    assert info["backend"] == "numpy"


def test_auto_prefers_numba_for_large_problems():
    pytest.importorskip("numba")
    q = np.zeros((4, 512, 8))
    _, info = eff_attn.attention(q, q, q, return_info=True)
    assert info["backend"] == "numba"


def test_auto_skips_a_backend_that_cannot_run_the_options():
    pytest.importorskip("numba")
    q = np.zeros((4, 512, 8))
    _, info = eff_attn.attention(q, q, q, algorithm="naive", return_info=True)
    assert info["backend"] == "numpy"


def test_backends_reports_availability_and_reasons():
    report = eff_attn.backends()
    assert set(report) == {"numpy", "numba", "cupy"}
    assert report["numpy"]["available"] is True
    for entry in report.values():
        assert isinstance(entry["reason"], str) and entry["reason"]


def test_every_registered_method_has_three_backends_and_a_flops_count():
    for name in registry.method_names(builtin_only=True):
        method = registry.get_method(name)
        assert {impl.backend for impl in method.impls} == {"numpy", "numba", "cupy"}, name
        assert method.flops(64, 64, 16) > 0
        assert method.budgets, name


def test_leading_axes_broadcast_and_output_keeps_dtype():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    k = rng.standard_normal((1, 7, 4)).astype(np.float32)
    v = rng.standard_normal((3, 7, 2)).astype(np.float32)
    out = eff_attn.attention(q, k, v)
    assert out.shape == (2, 3, 5, 2) and out.dtype == np.float32
    expected = eff_attn.attention(q[1, 2], k[0], v[2])
    assert_close(out[1, 2], expected, rel=1e-6)




def test_runtime_methods_register_and_unregister_but_builtins_stay():
    exact = registry.get_method("exact")
    copy = registry.Method(name="exact_copy_for_test", summary="test", resolve=exact.resolve, flops=exact.flops,
                           impls=exact.impls)
    registry.register(copy)
    try:
        assert "exact_copy_for_test" in registry.method_names()
        assert "exact_copy_for_test" not in registry.method_names(builtin_only=True)
        with pytest.raises(ValueError, match="already registered"):
            registry.register(copy)
    finally:
        registry.unregister("exact_copy_for_test")
    assert "exact_copy_for_test" not in registry.method_names()
    with pytest.raises(ValueError, match="only those can be removed"):
        registry.unregister("exact")
    with pytest.raises(ValueError, match="only those can be removed"):
        registry.unregister("no_such_method")
