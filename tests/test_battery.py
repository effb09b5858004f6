"""A battery of bad and edge-case inputs over every registered method.

Each *kind* builds one call (tiny shapes) and says what it must give, per
method: a clean error whose message names the argument
(``pytest.raises(..., match=...)``), or a result. A result must have the
expected shape and dtype, be finite on finite input, give 0 on rows that see
no key, and pass the kind's oracle: float64 dense attention
(``tests/_oracles.py``) for ``exact``; for every method, properties that hold
by the math (a constant ``v`` gives that constant from a normalised weighting;
the output is linear in ``v``; a row attends a convex combination of values
for the methods whose weights are non-negative and sum to one).

Every method runs on NumPy; ``NUMBA_METHODS`` run on Numba too, where a
result must also agree with NumPy's at the same seed.

``python -m tests.test_battery`` prints the counts (kinds, runs, crashes,
silent NaN on finite input, cross-backend disagreements).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

import eff_attn
from eff_attn import _backend
from eff_attn.registry import NotSupportedError, get_method, method_names
from tests._oracles import dense_attention, visible_matrix

METHODS = tuple(method_names(builtin_only=True))
#: The methods the battery also runs on Numba.
NUMBA_METHODS = ("exact", "local", "routing", "yoso", "performer", "treeformer_tf")
#: Methods whose output rows are convex combinations of the visible values
#: (non-negative weights summing to 1 on a non-empty row).
CONVEX = frozenset({"exact", "uniform", "topk_oracle", "local", "performer", "routing", "reformer",
                    "treeformer_tf", "treeformer_tc", "entmax", "sparsefinder"})
#: Methods whose output is ``A(q, k) v`` with rows of ``A`` summing to 1: a constant ``v`` gives
#: that constant on every non-empty row (yoso's default output is normalised per row instead).
AVERAGING = CONVEX | {"kdeformer"}
#: Methods with no causal form (refused with a NotSupportedError naming ``causal``).
NO_CAUSAL = frozenset({"yoso", "kdeformer", "routing", "nystrom", "treeformer_tc"})
#: Methods that draw from ``rng`` with their default parameters.
USES_RNG = frozenset({"yoso", "kdeformer", "performer", "routing", "reformer", "sparsefinder"})
#: Each method's size parameter, for the absurd-size kinds.
SIZE_PARAM = {"performer": "num_features", "reformer": "num_hashes", "yoso": "num_hashes",
              "kdeformer": "num_samples", "routing": "num_clusters", "treeformer_tf": "height",
              "treeformer_tc": "height", "nystrom": "num_landmarks"}

# --- expectations ------------------------------------------------------------------------


@dataclass(frozen=True)
class Raises:
    """A clean error: this type, with a message matching ``match`` (which names the argument)."""

    exc: type
    match: str


@dataclass(frozen=True)
class Result:
    """A result; ``oracle(method, out, call)`` raises AssertionError when it is wrong."""

    oracle: Callable | None = None
    finite: bool = True


@dataclass
class Call:
    """The arguments of one battery call."""

    q: object
    k: object
    v: object
    kwargs: dict = field(default_factory=dict)
    vjp: Callable | None = None  # vjp(method, backend, call) -> result, for the pullback kinds


@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable          # make(method) -> Call
    expect: Callable        # expect(method, backend) -> Raises | Result


def _qkv(seed=0, Nq=9, Nk=None, D=4, Dv=None, batch=(1,), dtype=np.float64, scale=1.0):
    rng = np.random.default_rng(seed)
    Nk, Dv = Nq if Nk is None else Nk, D if Dv is None else Dv
    q, k, v = (scale * rng.standard_normal((*batch, n, d)) for n, d in ((Nq, D), (Nk, D), (Nk, Dv)))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _call(**shape):
    return lambda method: Call(*_qkv(**shape))


def result(oracle=None):
    return lambda method, backend: Result(oracle)


def raises(exc, match):
    return lambda method, backend: Raises(exc, match)


def _visible(call):
    """(G..., Nq, Nk) visibility from first principles (tests/_oracles.py)."""
    q, k = np.asarray(call.q), np.asarray(call.k)
    return visible_matrix(q.shape[-2], k.shape[-2], call.kwargs.get("mask"), call.kwargs.get("causal", False))


def exact_oracle(method, out, call):
    """``exact`` equals float64 dense attention; other methods are not held to it."""
    if method != "exact":
        return
    k, v = np.asarray(call.k, np.float64), np.asarray(call.v, np.float64)
    mask = call.kwargs.get("mask")
    if mask is not None:  # masked rows never matter, whatever they hold
        k, v = (np.where(np.asarray(mask)[..., None], a, 0.0) for a in (k, v))
    want, _ = dense_attention(call.q, k, v, _visible(call), call.kwargs.get("scale"))
    tol = 1e-5 if np.asarray(out).dtype == np.float32 else 1e-10
    _assert_rel(out, want, tol)


def convex_oracle(method, out, call):
    """Each non-empty row lies within the per-column range of the visible values."""
    exact_oracle(method, out, call)
    if method not in CONVEX:
        return
    out, v = np.asarray(out, np.float64), np.asarray(call.v, np.float64)
    vis = np.broadcast_to(_visible(call), (*np.broadcast_shapes(out.shape[:-2], v.shape[:-2]),
                                           out.shape[-2], v.shape[-2]))
    big = np.where(vis[..., None], v[..., None, :, :], -np.inf).max(-2)      # (..., Nq, Dv)
    small = np.where(vis[..., None], v[..., None, :, :], np.inf).min(-2)
    rows = vis.any(-1)[..., None]
    slack = 1e-4 * np.abs(v).max() if out.dtype == np.float32 else 1e-9 * np.abs(v).max()
    inside = (out <= big + slack) & (out >= small - slack)
    assert np.where(rows, inside, True).all(), f"{method}: output outside the hull of the visible values"


def constant_oracle(value):
    def check(method, out, call):
        out = np.asarray(out, np.float64)
        rows = _visible(call).any(-1)
        if method in AVERAGING:
            want = np.where(rows[..., None], value, 0.0)
        elif method == "yoso":  # normalised rows: the unit vector of the constant row
            want = np.where(rows[..., None], np.sign(value) / np.sqrt(out.shape[-1]), 0.0)
        else:
            return
        _assert_rel(out, np.broadcast_to(want, out.shape), 1e-4 if np.asarray(call.v).dtype == np.float32 else 1e-6)
    return check


def linear_in_v_oracle(exponent):
    """``out(q, k, v) = 2**e out(q, k, v / 2**e)`` (yoso's normalised rows: ``out(v / 2**e)``).

    ``v / 2**e`` is exact and of moderate size, so the right side cannot
    overflow; the left side, on ``v`` near the top of the range, must match.
    """
    def check(method, out, call):
        factor = 2.0**exponent
        small = eff_attn.attention(call.q, call.k, call.v / call.v.dtype.type(factor), method=method,
                                   backend="numpy", rng=0, **_base(method), **call.kwargs)
        want = small if method == "yoso" else factor * small.astype(np.float64)
        _assert_rel(out, want, 1e-5 if call.v.dtype == np.float32 else 1e-12)
    return check


def zero_oracle(method, out, call):
    assert not np.asarray(out).any(), f"{method}: expected zeros"


def _assert_rel(actual, desired, tol):
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, f"shape {actual.shape} != {desired.shape}"
    scale = max(np.abs(desired).max(initial=0.0), np.finfo(np.float64).tiny)
    err = np.abs(actual - desired).max(initial=0.0) / scale
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


# --- the kinds ---------------------------------------------------------------------------


def _with(**kwargs):
    """A call on the default tiny inputs with extra keyword arguments."""
    return lambda method: Call(*_qkv(), kwargs=dict(kwargs))


def _replace(index, value):
    """The default inputs with q, k or v (index 0, 1, 2) replaced."""
    def make(method):
        arrays = list(_qkv())
        arrays[index] = value() if callable(value) else value
        return Call(*arrays)
    return make


def _poisoned(name, where, value, check_finite=True, mask=None):
    def make(method):
        arrays = dict(zip("qkv", _qkv()))
        arrays[name][where] = value
        kwargs = {"check_finite": check_finite}
        if mask is not None:
            kwargs["mask"] = mask
        return Call(arrays["q"], arrays["k"], arrays["v"], kwargs=kwargs)
    return make


def _masked(mask, **shape):
    return lambda method: Call(*_qkv(**shape), kwargs={"mask": np.asarray(mask)})


def _causal(causal, Nq, Nk):
    return lambda method: Call(*_qkv(Nq=Nq, Nk=Nk), kwargs={"causal": causal})


def _causal_expect(method, backend):
    return Raises(NotSupportedError, "causal") if method in NO_CAUSAL else Result(convex_oracle)


def _square_only(oracle=None):
    """Reformer sorts queries and keys into shared chunks: it refuses Nq != Nk, naming both."""
    def expect(method, backend):
        return Raises(NotSupportedError, r"Nq == Nk") if method == "reformer" else Result(oracle)
    return expect


def _causal_nonsquare_expect(method, backend):
    if method in NO_CAUSAL:
        return Raises(NotSupportedError, "causal")
    return _square_only(convex_oracle)(method, backend)


def _scale_expect(value):
    def expect(method, backend):
        if method == "yoso":
            return Raises(NotSupportedError, "scale")
        if method == "performer" and value <= 0:
            return Raises(ValueError, r"scale > 0")
        return Result(convex_oracle)
    return expect


def _size(value, exc=ValueError, pattern="{p}={v}"):
    """The method's size parameter set to ``value``; methods without one have no such parameter."""
    def make(method):
        name = SIZE_PARAM.get(method, "num_things")
        return Call(*_qkv(), kwargs={name: value})

    def expect(method, backend):
        if method not in SIZE_PARAM:
            return Raises(TypeError, "has no parameter 'num_things'")
        return Raises(exc, pattern.format(p=SIZE_PARAM[method], v=re.escape(str(value))))
    return make, expect


def _nan_propagates(name):
    """NaN in every entry of q or v with check_finite=False: every row that attends a key is NaN."""
    def make(method):
        arrays = dict(zip("qkv", _qkv()))
        arrays[name][...] = np.nan
        return Call(arrays["q"], arrays["k"], arrays["v"], kwargs={"check_finite": False})

    def check(method, out, call, info=None):
        rows = ~np.asarray(info["empty_rows"])
        if name == "q" and method == "uniform":   # uniform reads no query
            return
        assert np.isnan(np.asarray(out)[rows]).all(), f"{method}: NaN input did not propagate to attended rows"
    return make, lambda method, backend: Result(check, finite=False)


def _vjp_with(dout_of):
    def run(method, backend, call):
        out, vjp = eff_attn.attention_vjp(call.q, call.k, call.v, method=method, backend=backend, rng=0,
                                          **_base(method), **call.kwargs)
        return vjp(dout_of(out))
    return run


def _vjp_expect(exc=None, match=None):
    def expect(method, backend):
        if method == "kdeformer":
            return Raises(NotSupportedError, "kdeformer")
        return Raises(exc, match) if exc else Result()
    return expect


def _torch_inplace_vjp(method, backend, call):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(a.copy()) for a in (call.q, call.k, call.v))
    out, vjp = eff_attn.attention_vjp(q, k, v, method=method, backend=backend, rng=0, **_base(method))
    k.mul_(2.0)
    return vjp(torch.ones_like(out))


def _numpy_inplace_vjp(method, backend, call):
    """Documented: the pullback holds q, k, v by reference, and the gradients it returns are its own.

    Editing the inputs after ``vjp(dout)`` returned leaves the gradients as they were (the
    documented rule is only about edits between the forward pass and the call).
    """
    q, k, v = (a.copy() for a in (call.q, call.k, call.v))
    out, vjp = eff_attn.attention_vjp(q, k, v, method=method, backend=backend, rng=0, **_base(method))
    grads = vjp(np.ones_like(out))
    kept = [g.copy() for g in grads]
    for a in (q, k, v):
        a *= 2.0
    for g, before in zip(grads, kept):
        assert np.array_equal(g, before), f"{method}: a gradient aliases an input"
    return grads


def _threads(method, backend, call):
    """Four threads give the serial result."""
    kwargs = dict(method=method, backend=backend, rng=3, **_base(method))
    serial = eff_attn.attention(call.q, call.k, call.v, **kwargs)
    outs = [None] * 4

    def work(i):
        outs[i] = eff_attn.attention(call.q, call.k, call.v, **kwargs)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in outs:
        assert np.array_equal(o, serial), f"{method}: a threaded call differs from the serial one"
    return serial


def _seeded_twice(method, backend, call):
    """An int seed reproduces; a Generator seeded alike gives the same draw."""
    a = eff_attn.attention(call.q, call.k, call.v, method=method, backend=backend, rng=11, **_base(method))
    b = eff_attn.attention(call.q, call.k, call.v, method=method, backend=backend, rng=11, **_base(method))
    c = eff_attn.attention(call.q, call.k, call.v, method=method, backend=backend,
                           rng=np.random.default_rng(11), **_base(method))
    assert np.array_equal(a, b), f"{method}: rng=11 twice differs"
    assert np.array_equal(a, c), f"{method}: rng=11 and default_rng(11) differ"
    return a


def _empty_batch_vjp(method, backend, call):
    out, vjp = eff_attn.attention_vjp(call.q, call.k, call.v, method=method, backend=backend, rng=0,
                                      **_base(method))
    grads = vjp(np.zeros_like(out))
    for g, x in zip(grads, (call.q, call.k, call.v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    return out


def _huge(dtype, value, constant=True):
    def make(method):
        q, k, v = _qkv(dtype=dtype)
        if constant:
            v = np.full_like(v, value)
        else:
            v = (value * np.random.default_rng(5).uniform(-1, 1, v.shape)).astype(dtype)
        return Call(q, k, v)
    return make


def _fully_masked_slice(method):
    q, k, v = _qkv(batch=(2,))
    mask = np.ones((2, 9), bool)
    mask[0] = False
    return Call(q, k, v, kwargs={"mask": mask})


def _torch_inputs(method, backend, call):
    torch = pytest.importorskip("torch")
    out = eff_attn.attention(*(torch.from_numpy(a) for a in (call.q, call.k, call.v)), method=method,
                             backend=backend, rng=0, **_base(method))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    return out.numpy()


def _noncontiguous(method, backend, call):
    """A transposed (strided) view gives the result of its contiguous copy."""
    qt = np.ascontiguousarray(np.swapaxes(call.q, -1, -2))
    view = np.swapaxes(qt, -1, -2)                                          # strided, same values
    kwargs = dict(method=method, backend=backend, rng=0, **_base(method))
    a = eff_attn.attention(view, call.k, call.v, **kwargs)
    assert np.array_equal(a, eff_attn.attention(np.ascontiguousarray(view), call.k, call.v, **kwargs))
    return a


def _readonly(method, backend, call):
    for a in (call.q, call.k, call.v):
        a.flags.writeable = False
    return eff_attn.attention(call.q, call.k, call.v, method=method, backend=backend, rng=0, **_base(method))


def _runner(fn, expect=None):
    """A kind that runs ``fn(method, backend, call)`` instead of a plain attention call."""
    def make(method):
        return Call(*_qkv(), vjp=fn)
    return make, expect or result(convex_oracle)


_m, _e = {}, {}
_m["size_absurd"], _e["size_absurd"] = _size(2**62, ValueError, "{p}={v} is too large")
_m["size_negative"], _e["size_negative"] = _size(-1, ValueError, "{p}=-1 is too small")
_m["size_float"], _e["size_float"] = _size(2.5, TypeError, "{p} must be an integer")
_m["nan_v"], _e["nan_v"] = _nan_propagates("v")
_m["nan_q"], _e["nan_q"] = _nan_propagates("q")

KINDS = [
    # --- q, k, v themselves -------------------------------------------------------------
    Kind("q_none", _replace(0, None), raises(TypeError, "q is None")),
    Kind("k_list", _replace(1, lambda: [[0.0] * 4] * 9), raises(TypeError, "^k: expected")),
    Kind("v_int", _replace(2, lambda: np.ones((1, 9, 4), np.int64)), raises(TypeError, "v must be a float32")),
    Kind("q_float16", _replace(0, lambda: np.ones((1, 9, 4), np.float16)),
         raises(NotSupportedError, "q has dtype float16")),
    Kind("q_complex", _replace(0, lambda: np.ones((1, 9, 4), np.complex128)), raises(TypeError, "q must be a float32")),
    Kind("mixed_dtype", _replace(0, lambda: _qkv()[0].astype(np.float32)),
         raises(TypeError, "q, k and v must share one dtype")),
    Kind("q_1d", _replace(0, lambda: np.ones(4)), raises(ValueError, "q must have shape")),
    Kind("k_D_mismatch", _replace(1, lambda: np.ones((1, 9, 5))), raises(ValueError, "k has D=5")),
    Kind("v_N_mismatch", _replace(2, lambda: np.ones((1, 8, 4))), raises(ValueError, "v has Nk=8")),
    Kind("q_no_rows", _replace(0, lambda: np.ones((1, 0, 4))), raises(ValueError, "q has no rows")),
    Kind("k_no_rows", lambda m: Call(_qkv()[0], np.ones((1, 0, 4)), np.ones((1, 0, 4))),
         raises(ValueError, "k has no rows")),
    Kind("D_zero", lambda m: Call(*(np.ones((1, 3, 0)),) * 3), raises(ValueError, "D=0")),
    Kind("Dv_zero", _replace(2, lambda: np.ones((1, 9, 0))), raises(ValueError, "Dv=0")),
    Kind("batch_mismatch", lambda m: Call(*_qkv(batch=(2,))[:2], np.ones((3, 9, 4))),
         raises(ValueError, r"leading \(batch, head\) axes")),
    Kind("q_nan", _poisoned("q", (0, 0, 0), np.nan), raises(ValueError, "q contains NaN")),
    Kind("k_inf", _poisoned("k", (0, 2, 1), np.inf), raises(ValueError, "k contains NaN or inf in a kept row")),
    Kind("v_nan", _poisoned("v", (0, 3, 0), np.nan), raises(ValueError, "v contains NaN or inf in a kept row")),
    Kind("k_nan_masked", _poisoned("k", (0, 8, 0), np.nan, mask=np.arange(9) < 8), result(convex_oracle)),
    Kind("v_inf_masked", _poisoned("v", (0, 0, 1), -np.inf, mask=np.arange(9) > 0), result(convex_oracle)),
    Kind("check_finite_str", _with(check_finite="yes"), raises(TypeError, "check_finite must be True or False")),
    Kind("nan_v_propagates", _m["nan_v"], _e["nan_v"]),
    Kind("nan_q_propagates", _m["nan_q"], _e["nan_q"]),
    # --- mask -----------------------------------------------------------------------------
    Kind("mask_list", _with(mask=[True] * 9), raises(TypeError, "^mask: expected")),
    Kind("mask_float", _with(mask=np.ones(9)), raises(TypeError, "mask must be a boolean")),
    Kind("mask_wrong_len", _with(mask=np.ones(8, bool)), raises(ValueError, r"mask must have shape \(\.\.\., Nk\)")),
    Kind("mask_scalar", _with(mask=np.bool_(True)), raises(ValueError, r"mask must have shape \(\.\.\., Nk\)")),
    Kind("mask_bad_batch", lambda m: Call(*_qkv(batch=(2,)), kwargs={"mask": np.ones((3, 9), bool)}),
         raises(ValueError, r"leading \(batch, head\) axes")),
    Kind("mask_some", _masked(np.arange(9) % 3 != 1), result(convex_oracle)),
    Kind("mask_one_key", _masked(np.arange(9) == 4), result(convex_oracle)),
    Kind("mask_none_kept", _masked(np.zeros(9, bool)), result(zero_oracle)),
    Kind("slice_fully_masked", _fully_masked_slice, result(convex_oracle)),
    Kind("mask_per_head", _masked(np.random.default_rng(1).random((2, 3, 9)) > 0.4, batch=(2, 3)),
         result(convex_oracle)),
    # --- causal and scale -------------------------------------------------------------------
    Kind("causal_bad", _with(causal="sideways"), raises(ValueError, "causal='sideways' is not valid")),
    Kind("causal_square", _causal(True, 9, 9), _causal_expect),
    Kind("causal_top_left", _causal("top_left", 5, 9), _causal_nonsquare_expect),
    Kind("causal_bottom_right", _causal("bottom_right", 5, 9), _causal_nonsquare_expect),
    Kind("causal_more_queries", _causal("top_left", 11, 6), _causal_nonsquare_expect),
    Kind("scale_huge_int", _with(scale=10**400), raises(ValueError, "scale must be finite")),
    Kind("scale_inf", _with(scale=float("inf")), raises(ValueError, "scale must be finite")),
    Kind("scale_nan", _with(scale=float("nan")), raises(ValueError, "scale must be finite")),
    Kind("scale_str", _with(scale="0.5"), raises(TypeError, "scale must be a real number")),
    Kind("scale_bool", _with(scale=True), raises(TypeError, "scale must be a real number")),
    Kind("scale_zero", _with(scale=0.0), _scale_expect(0.0)),
    Kind("scale_negative", _with(scale=-0.5), _scale_expect(-0.5)),
    Kind("scale_large", _with(scale=1e4), _scale_expect(1e4)),
    # --- dispatch and parameters --------------------------------------------------------------
    Kind("backend_unknown", _with(backend="gpu9"), raises(ValueError, "backend='gpu9' is not one of")),
    Kind("param_unknown", _with(bogus=1), raises(TypeError, "has no parameter 'bogus'")),
    Kind("rng_str", _with(rng="seed"),
         lambda m, b: Raises(TypeError, "rng must be") if m in USES_RNG else Result(convex_oracle)),
    Kind("size_absurd", _m["size_absurd"], _e["size_absurd"]),
    Kind("size_negative", _m["size_negative"], _e["size_negative"]),
    Kind("size_float", _m["size_float"], _e["size_float"]),
    # --- shapes -----------------------------------------------------------------------------
    Kind("empty_batch", lambda m: Call(*_qkv(batch=(0,))), result()),
    Kind("empty_batch_4d", lambda m: Call(*_qkv(batch=(2, 0))), result()),
    Kind("one_token", _call(Nq=1), result(convex_oracle)),
    Kind("four_points", _call(Nq=2, D=3), result(convex_oracle)),
    Kind("odd_nonsquare", _call(Nq=7, Nk=13), _square_only(convex_oracle)),
    Kind("more_queries", _call(Nq=17, Nk=5), _square_only(convex_oracle)),
    Kind("D_one", _call(D=1), result(convex_oracle)),
    Kind("Dv_wide", _call(D=3, Dv=11), result(convex_oracle)),
    Kind("broadcast_heads", lambda m: Call(_qkv(batch=(2, 1))[0], *_qkv(batch=(1, 3))[1:]), result(convex_oracle)),
    Kind("batch_4d", _call(batch=(2, 2)), result(convex_oracle)),
    Kind("float32", _call(dtype=np.float32), result(convex_oracle)),
    Kind("N_33", _call(Nq=33), result(convex_oracle)),
    # --- values -------------------------------------------------------------------------------
    Kind("large_logits", _call(scale=30.0), result(convex_oracle)),
    Kind("tiny_values", _call(scale=1e-30), result(convex_oracle)),
    Kind("q_zero", lambda m: Call(np.zeros((1, 9, 4)), *_qkv()[1:]), result(convex_oracle)),
    Kind("keys_identical", lambda m: Call(_qkv()[0], np.ones((1, 9, 4)), _qkv()[2]), result(convex_oracle)),
    Kind("queries_identical", lambda m: Call(np.ones((1, 9, 4)), *_qkv()[1:]), result(convex_oracle)),
    Kind("v_zero", lambda m: Call(*_qkv()[:2], np.zeros((1, 9, 4))), result(zero_oracle)),
    Kind("v_constant", lambda m: Call(*_qkv()[:2], np.full((1, 9, 4), -2.5)), result(constant_oracle(-2.5))),
    Kind("v_3e37_float32", _huge(np.float32, 3e37), result(constant_oracle(3e37))),
    Kind("v_1e38_float32", _huge(np.float32, 1e38, constant=False), result(linear_in_v_oracle(126))),
    Kind("v_1e307_float64", _huge(np.float64, 1e307, constant=False), result(linear_in_v_oracle(1019))),
    # --- the pullback and the call itself ---------------------------------------------------
    Kind("vjp_dout_list", *_runner(_vjp_with(lambda out: [0.0]), _vjp_expect(TypeError, "^dout: expected"))),
    Kind("vjp_dout_shape", *_runner(_vjp_with(lambda out: np.zeros(3)),
                                    _vjp_expect(ValueError, "dout must have the output's shape"))),
    Kind("vjp_basic", *_runner(_vjp_with(np.ones_like), _vjp_expect())),
    Kind("vjp_torch_inplace", *_runner(_torch_inplace_vjp, _vjp_expect(RuntimeError, "k was modified in place"))),
    Kind("vjp_numpy_inplace", *_runner(_numpy_inplace_vjp, _vjp_expect())),
    Kind("vjp_empty_batch", lambda m: Call(*_qkv(batch=(0,)), vjp=_empty_batch_vjp), _vjp_expect()),
    Kind("threads", *_runner(_threads)),
    Kind("seed_reproduces", *_runner(_seeded_twice)),
    Kind("torch_in_torch_out", *_runner(_torch_inputs)),
    Kind("noncontiguous", *_runner(_noncontiguous)),
    Kind("readonly", *_runner(_readonly)),
]
KIND_BY_NAME = {kind.name: kind for kind in KINDS}
assert len(KIND_BY_NAME) == len(KINDS)


# --- running one case ---------------------------------------------------------------------


def _base(method):
    """What a method needs to run at all (Sparsefinder fits its state on the call's inputs)."""
    return dict(get_method(method).compare_defaults)


def run_call(kind: Kind, method: str, backend: str):
    """Run one case; returns ``(out, info, call)`` or raises what the call raised."""
    call = kind.make(method)
    if call.vjp is not None:
        return call.vjp(method, backend, call), None, call
    kwargs = {"rng": 0, **_base(method), **call.kwargs}
    kwargs.setdefault("backend", backend)
    out, info = eff_attn.attention(call.q, call.k, call.v, method=method, return_info=True, **kwargs)
    return out, info, call


def _expected_shape(call):
    q, k, v = (np.asarray(a) for a in (call.q, call.k, call.v))
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return (*lead, q.shape[-2], v.shape[-1]), q.dtype


def check_case(kind: Kind, method: str, backend: str):
    """Run one case and check it against its expectation; returns the output (None for an error)."""
    expect = kind.expect(method, backend)
    if isinstance(expect, Raises):
        with pytest.raises(expect.exc, match=expect.match):
            run_call(kind, method, backend)
        return None
    out, info, call = run_call(kind, method, backend)
    out = np.asarray(out)
    if call.vjp is None:
        shape, dtype = _expected_shape(call)
        assert out.shape == shape and out.dtype == dtype, f"got {out.shape} {out.dtype}, want {shape} {dtype}"
        if expect.finite:
            assert np.isfinite(out).all(), f"{method}: non-finite output on finite input"
            empty = np.asarray(info["empty_rows"])
            assert not out[empty].any(), f"{method}: a row that attends nothing is not 0"
    if expect.oracle is not None:
        if expect.finite:
            expect.oracle(method, out, call)
        else:
            expect.oracle(method, out, call, info)
    return out


def check_numba_case(kind: Kind, method: str):
    """:func:`check_case` on Numba, then a finite result must equal NumPy's at the same seed."""
    out = check_case(kind, method, "numba")
    if out is None or kind.make(method).vjp is not None or not np.isfinite(out).all():
        return
    ref = np.asarray(run_call(kind, method, "numpy")[0])
    _assert_rel(out, ref, 2e-5 if out.dtype == np.float32 else 1e-10)


def cases(backend):
    methods = METHODS if backend == "numpy" else NUMBA_METHODS
    return [
        pytest.param(kind.name, method, id=f"{kind.name}-{method}")
        for kind in KINDS for method in methods
    ]


@pytest.mark.parametrize("kind, method", cases("numpy"))
def test_battery_numpy(kind, method):
    check_case(KIND_BY_NAME[kind], method, "numpy")


_NUMBA = pytest.mark.skipif(not _backend.available("numba")[0], reason="numba is not installed")


@_NUMBA
@pytest.mark.parametrize("kind, method", cases("numba"))
def test_battery_numba_matches_numpy(kind, method):
    """Numba meets the same expectation, and a result equals NumPy's at the same seed."""
    check_numba_case(KIND_BY_NAME[kind], method)


def test_battery_is_large_enough():
    assert len(KINDS) >= 60


# --- counts for the report ------------------------------------------------------------------


def summarize():
    """Run every case and count the outcomes."""
    counts = dict(kinds=len(KINDS), runs=0, passed=0, crashes=0, silent_nan=0, disagreements=0, other_failures=0)
    failures = []
    for backend in ("numpy", "numba"):
        for kind in KINDS:
            for method in METHODS if backend == "numpy" else NUMBA_METHODS:
                counts["runs"] += 1
                try:
                    if backend == "numba":
                        check_numba_case(kind, method)
                    else:
                        check_case(kind, method, backend)
                    counts["passed"] += 1
                except (AssertionError, pytest.fail.Exception) as exc:
                    text = str(exc)
                    key = ("silent_nan" if "non-finite output" in text else
                           "disagreements" if "relative error" in text and backend == "numba" else
                           "other_failures")
                    counts[key] += 1
                    failures.append(f"{backend} {kind.name} {method}: {text.splitlines()[0][:160]}")
                except Exception as exc:  # noqa: BLE001 - an unexpected exception is a crash
                    counts["crashes"] += 1
                    failures.append(f"{backend} {kind.name} {method}: {type(exc).__name__}: {str(exc)[:160]}")
    return counts, failures


if __name__ == "__main__":
    totals, failed = summarize()
    print(totals)
    print("\n".join(failed))
