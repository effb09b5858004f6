"""Template: write your own attention method, on all three backends, in one file.

    python examples/custom_method.py --backend numba
    python examples/custom_method.py --backend cupy --n 4096

Copy this file and replace the math. The example is *sigmoid attention*: each
weight is an independent sigmoid instead of a softmax over the row,

    o_i = sum_{j visible} sigma(s_ij + b) v_j,    s_ij = scale * q_i . k_j,

with the bias ``b = -log(Nk)`` by default, so that the row sum starts near 1.
Time O(Nq Nk (D + Dv)), like exact attention, but no row maximum or normaliser:
rows are independent of each other and of the row sum.

The file has the four parts every method needs (docs/tutorials/adding-a-method.md
walks through them one by one):

1. an array-program reference, written once for NumPy and CuPy (``xp``), with its
   backward;
2. a Numba kernel for the CPU;
3. a ``Method`` record that declares what each backend can do, registered at run time;
4. checks: the backends agree, the backward matches finite differences, and
   unsupported options are refused. Then the method runs in ``eff-attn compare``'s
   engine next to exact attention.
"""

from __future__ import annotations

import argparse
import math
import types

import numpy as np

import eff_attn
from eff_attn import masks, registry
from eff_attn._cuda import xp_of
from eff_attn._validate import check_float

NAME = "sigmoid_example"


# --- 1. the reference: NumPy and CuPy ------------------------------------------------


def _sigmoid(x, xp):
    return 0.5 * (1 + xp.tanh(0.5 * x))                                      # stable for any |x|


def _weights(q, k, mask, offset, scale, bias, xp):
    """``P = sigma(scale q k^T + b)`` on the visible pairs, 0 elsewhere."""
    S = scale * (q @ xp.swapaxes(k, -1, -2))                                 # (G, Nq, Nk)
    visible = masks.visible_pairs(mask, offset, q.shape[-2], k.shape[-2], xp)  # (G or 1, Nq, Nk)
    return xp.where(visible, _sigmoid(S + bias, xp), 0).astype(q.dtype)     # (G, Nq, Nk)


def _bias(bias, Nk):
    return -math.log(max(Nk, 1)) if bias is None else bias


def reference_forward(q, k, v, *, mask, offset, scale, bias):
    xp = xp_of(q)
    P = _weights(q, k, mask, offset, scale, _bias(bias, k.shape[-2]), xp)   # (G, Nq, Nk)
    return P @ v, {"P": P}                                                  # (G, Nq, Dv)


def reference_backward(dout, q, k, v, out, res, *, mask, offset, scale, bias):
    """``dS = (dO v^T) * P (1 - P)``; then ``dq = scale dS k``, ``dk = scale dS^T q``, ``dv = P^T dO``."""
    xp = xp_of(q)
    P = res["P"]                                                            # (G, Nq, Nk)
    dv = xp.swapaxes(P, -1, -2) @ dout                                      # (G, Nk, Dv)
    dP = dout @ xp.swapaxes(v, -1, -2)                                      # (G, Nq, Nk)
    dS = dP * P * (1 - P)                                                   # (G, Nq, Nk); 0 off the visible pairs
    return scale * (dS @ k), scale * (xp.swapaxes(dS, -1, -2) @ q), dv


reference = types.SimpleNamespace(forward=reference_forward, backward=reference_backward)


# --- 2. the Numba kernel: one task per (slice, query), nothing of size Nq x Nk -------

try:
    from numba import njit, prange
except ImportError:                                                          # numba is an optional extra
    njit = None

if njit is not None:

    # Inside the package, eff_attn._jit.kernel adds the package's settings (cache=True, fast-math).
    @njit(parallel=True)
    def _sigmoid_rows(q, k, v, keep, causal, o, scale, bias, out):
        G, Nq, D = q.shape
        Nk, Dv = k.shape[1], v.shape[2]
        for task in prange(G * Nq):
            g, i = task // Nq, task % Nq
            last = max(0, min(Nk, i + o + 1)) if causal else Nk             # causal: keys j <= i + o
            s = k[g, :last] @ (q[g, i] * scale)                             # (last,)
            acc = np.zeros(Dv, dtype=q.dtype)                                # (Dv,)
            for j in range(last):
                if keep.shape[0] == 0 or keep[g, j]:
                    acc += v[g, j] / (1 + np.exp(-(s[j] + bias)))
            out[g, i] = acc


def numba_forward(q, k, v, *, mask, offset, scale, bias):
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    keep = np.empty((0, 0), dtype=bool) if mask is None else mask
    out = np.empty(q.shape[:2] + v.shape[2:], dtype=q.dtype)
    bias = q.dtype.type(_bias(bias, k.shape[1]))
    _sigmoid_rows(q, k, v, keep, offset is not None, offset or 0, q.dtype.type(scale), bias, out)
    return out, {}


numba_impl = types.SimpleNamespace(forward=numba_forward)


# --- 3. the record ---------------------------------------------------------------------


def resolve(problem, *, bias=None):
    """Check the parameters once, for every backend."""
    return {"bias": None if bias is None else check_float("bias", bias)}


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, **params):
    Dv = D if Dv is None else Dv
    pairs = masks.causal_pair_count(Nq, Nk, masks.causal_offset(causal, Nq, Nk))
    return batch * pairs * (2 * D + 2 * Dv + 4)                            # score, sigmoid (~4), weighted sum


def register() -> registry.Method:
    impls = [registry.Impl("numpy", reference), registry.Impl("cupy", reference)]
    if njit is not None:
        impls.insert(1, registry.Impl("numba", numba_impl, differentiable=False))
    method = registry.Method(name=NAME, summary="sigmoid attention (example template)", resolve=resolve,
                             flops=flops, impls=tuple(impls))
    return registry.register(method, replace=True)


# --- 4. checks, then a comparison --------------------------------------------------------


def check(backend: str, rng) -> None:
    from eff_attn.testing import assert_close, finite_difference_vjp

    q, k, v = (rng.standard_normal((2, 3, 40, 8)) for _ in range(3))
    mask = rng.random((2, 3, 40)) > 0.2
    for causal in (False, True):
        expected = eff_attn.attention(q, k, v, method=NAME, backend="numpy", mask=mask, causal=causal)
        xq, xk, xv, xmask = q, k, v, mask
        if backend == "cupy":
            import cupy

            xq, xk, xv, xmask = (cupy.asarray(a) for a in (q, k, v, mask))
        out = eff_attn.attention(xq, xk, xv, method=NAME, backend=backend, mask=xmask, causal=causal)
        assert_close(out, expected, rel=1e-10)
    print(f"{backend}: agrees with the NumPy reference (float64, masks, causal)")

    small = [a[:1, :1, :6, :3] for a in (q, k, v)]
    dout = rng.standard_normal((1, 1, 6, 3))
    _, vjp = eff_attn.attention_vjp(*small, method=NAME, backend="numpy", causal=True)
    numeric = finite_difference_vjp(lambda *a: eff_attn.attention(*a, method=NAME, backend="numpy", causal=True),
                                    small, dout)
    for got, want in zip(vjp(dout), numeric):
        assert_close(got, want, rel=1e-6)
    print("numpy: backward matches central finite differences")

    try:
        eff_attn.attention_vjp(q, k, v, method=NAME, backend="numba")
    except eff_attn.NotSupportedError as err:
        print("refused as declared:", str(err).splitlines()[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["numpy", "numba", "cupy"], default="numpy")
    parser.add_argument("--n", type=int, default=1024)
    args = parser.parse_args(argv)
    register()
    check(args.backend, np.random.default_rng(0))

    from eff_attn.bench.report import markdown_table
    from eff_attn.bench.runner import CompareConfig, run_compare

    result = run_compare(CompareConfig(methods=["exact", NAME, "uniform"], backends=[args.backend], ns=[args.n],
                                       problem="clustered", budgets="default", seeds=1, repeats=3, sdpa=False))
    print(markdown_table(result["rows"]))


if __name__ == "__main__":
    main()
