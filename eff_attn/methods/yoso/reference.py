"""YOSO in NumPy: the textbook, and the oracle of every test.

Per (batch, head) slice, with key keep-mask ``mu``::

    q^ = q / max(|q|, eps)   k^ likewise   x = q^ k^T           step 0
    YOSO-E   P_ij = mu_j (1 - arccos(clip(c x_ij, -1, 1)) / pi)^tau,   u = P v
    sampled  c_h(x) = sum_b 2^b [r_{h,b} . x > 0]               m codes per row
             T_h[b] = sum_{j kept, c_h(k_j) = b} v_j            2^tau rows per hash
             u_i    = (1/m) sum_h T_h[c_h(q_i)]  = (C v)_i
    output   y_i = u_i / max(|u_i|, eps)       (or y = u)

``C_ij = mu_j (1/m) sum_h [c_h(q_i) = c_h(k_j)]`` is the empirical collision
matrix; ``E[C] = P`` for Gaussian hyperplanes, so the sampled ``u`` is an
unbiased estimate of YOSO-E's.

The pipeline around the arithmetic (normalisation, the masks, codes, the
output and input normalisation of the backward) is written once here, in
:func:`forward_pipeline` and :func:`backward_pipeline`, and every backend runs
it with its own :class:`YosoOps`: the five heavy steps. This module's ops are
the dense textbook ones.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from ._common import EPS, EXACT_GRAD_Z_CAP, unit_rows, yoso_codes

__all__ = [
    "YosoOps",
    "zero_masked_rows",
    "normalize_output_rows",
    "expectation_weights",
    "surrogate_weights",
    "exact_weights",
    "bucket_tables",
    "table_lookup",
    "forward_pipeline",
    "backward_pipeline",
    "entry_points",
    "forward",
    "backward",
]


class YosoOps(NamedTuple):
    """The five heavy steps a backend supplies; the pipelines do the rest.

    codes(x, hyperplanes, hash_dtype) -> int32 (G, N, m)
    bucket_sum(src_codes, src_values, src_keep, dst_codes, tau) -> (sums (G, Nd, Dv), counts (G, Nd) int64)
        ``sums_i = sum_h sum_{j kept, c_h(src_j) = c_h(dst_i)} src_values_j`` and
        ``counts_i`` the number of such (h, j).
    expectation_sum(q_unit, k_unit, v, mask, tau, damping) -> (u (G, Nq, Dv), row_mass (G, Nq))
    bucket_pairs_backward(du, v, q_unit, k_unit, q_codes, k_codes, mask, tau) -> (dq_unit, dk_unit)
        ``sum_h sum_{colliding (i, j)} (du_i . v_j) k^_j`` (and ``q^_i`` for keys), unscaled.
    expectation_backward(du, q_unit, k_unit, v, mask, tau, damping, grad) -> (dq_unit, dk_unit, dv)
    """

    codes: Callable
    bucket_sum: Callable
    expectation_sum: Callable
    bucket_pairs_backward: Callable
    expectation_backward: Callable


# --------------------------------------------------------------------------------------
# Shared element-wise steps (array module ``xp``: NumPy here, CuPy on the GPU)
# --------------------------------------------------------------------------------------


def zero_masked_rows(x, mask, xp=np):
    """Rows of masked keys set to 0 with ``where``, so NaN or inf there cannot leak."""
    if mask is None:
        return x
    return xp.where(mask[..., None], x, 0).astype(x.dtype, copy=False)      # (..., Nk, *)


def normalize_output_rows(u, normalize, xp=np):
    """``y = u / max(|u|, eps)`` (or ``y = u``) and ``|u|``."""
    y, u_norm = unit_rows(u, xp)                                            # (..., Nq, Dv), (..., Nq)
    return (y.astype(u.dtype, copy=False) if normalize else u), u_norm


def expectation_weights(x, tau, damping, xp=np):
    """``F(z) = (1 - arccos z / pi)^tau`` at ``z = clip(c x, -1, 1)``."""
    z = xp.clip(damping * x, -1.0, 1.0)                                      # (..., Nq, Nk)
    return (1.0 - xp.arccos(z) / np.pi) ** tau                               # (..., Nq, Nk)


def surrogate_weights(A, tau, damping):
    """The paper's surrogate ``W = c (tau / 2) A`` of ``dA / dx``."""
    return (damping * tau / 2.0) * A                                         # (..., Nq, Nk)


def exact_weights(x, tau, damping, xp=np):
    """The true ``dP / dx = c F'(z)``, ``F'(z) = tau (1 - arccos z/pi)^(tau-1) / (pi sqrt(1 - z^2))``.

    ``z = c x`` is capped at ``+-(1 - 1e-6)``, where ``F'`` is still finite
    (the cap never binds for ``c <= 0.99``).
    """
    z = xp.clip(damping * x, -EXACT_GRAD_Z_CAP, EXACT_GRAD_Z_CAP)            # (..., Nq, Nk)
    if tau == 0:
        return xp.zeros_like(z)
    base = 1.0 - xp.arccos(z) / np.pi                                        # (..., Nq, Nk)
    return damping * tau * base ** (tau - 1) / (np.pi * xp.sqrt(1.0 - z * z))


def output_normalization_backward(dy, y, u_norm, normalize, xp=np):
    """Step 1: ``du_i = (dy_i - (dy_i . y_i) y_i) / |u_i|``, 0 where ``|u_i| <= eps``."""
    if not normalize:
        return dy
    radial = (dy * y).sum(axis=-1, keepdims=True)                            # (..., Nq, 1)
    live = (u_norm > EPS)[..., None]                                         # (..., Nq, 1)
    du = (dy - radial * y) / xp.where(live, u_norm[..., None], 1)            # (..., Nq, Dv)
    return xp.where(live, du, 0).astype(dy.dtype, copy=False)


def input_normalization_backward(d_unit, x_unit, x_norm, xp=np):
    """Step 4: ``dx_i = (dx^_i - (dx^_i . x^_i) x^_i) / |x_i|``, 0 where ``|x_i| <= eps``."""
    radial = (d_unit * x_unit).sum(axis=-1, keepdims=True)                   # (..., N, 1)
    live = (x_norm > EPS)[..., None]                                         # (..., N, 1)
    dx = (d_unit - radial * x_unit) / xp.where(live, x_norm[..., None], 1)   # (..., N, D)
    return xp.where(live, dx, 0).astype(d_unit.dtype, copy=False)


# --------------------------------------------------------------------------------------
# The dense ops of this module
# --------------------------------------------------------------------------------------


def bucket_tables(codes, values, keep, tau):
    """``T_h[b] = sum_{j kept, c_h(j) = b} values_j`` and the bucket sizes.

    Parameters
    ----------
    codes : int ndarray of shape (G, N, m)
    values : ndarray of shape (G, N, Dv)
    keep : bool ndarray of shape (G, N), or None
    tau : int

    Returns
    -------
    T : ndarray of shape (G, m, 2**tau, Dv)
    sizes : int64 ndarray of shape (G, m, 2**tau)
    """
    G, N, m = codes.shape
    Dv = values.shape[-1]
    keep = np.ones((G, N), dtype=bool) if keep is None else keep            # (G, N)
    g, j, h = np.nonzero(np.broadcast_to(keep[..., None], (G, N, m)))        # kept (slice, row, hash) triples
    T = np.zeros((G, m, 2**tau, Dv), dtype=values.dtype)                     # (G, m, 2^tau, Dv)
    sizes = np.zeros((G, m, 2**tau), dtype=np.int64)                         # (G, m, 2^tau)
    np.add.at(T, (g, h, codes[g, j, h]), values[g, j])                       # scatter-add the values
    np.add.at(sizes, (g, h, codes[g, j, h]), 1)
    return T, sizes


def table_lookup(T, sizes, codes):
    """``sum_h T_h[c_h(i)]`` and ``sum_h |bucket|`` for every row ``i`` of ``codes`` (G, N, m)."""
    G, N, m = codes.shape
    g = np.arange(G)[:, None, None]                                          # (G, 1, 1)
    h = np.arange(m)[None, None, :]                                          # (1, 1, m)
    sums = T[g, h, codes].sum(axis=2)                                        # (G, N, m, Dv) -> (G, N, Dv)
    counts = sizes[g, h, codes].sum(axis=2)                                  # (G, N)
    return sums, counts


def _bucket_sum(src_codes, src_values, src_keep, dst_codes, tau):
    T, sizes = bucket_tables(src_codes, src_values, src_keep, tau)          # (G, m, 2^tau, Dv)
    return table_lookup(T, sizes, dst_codes)                                 # (G, Nd, Dv), (G, Nd)


def _expectation_sum(q_unit, k_unit, v, mask, tau, damping):
    x = q_unit @ np.swapaxes(k_unit, -1, -2)                                 # (G, Nq, Nk)
    P = expectation_weights(x, tau, damping)                                 # (G, Nq, Nk)
    if mask is not None:
        P = np.where(mask[:, None, :], P, 0.0)                               # (G, Nq, Nk)
    return (P @ v).astype(v.dtype, copy=False), P.sum(axis=-1)               # (G, Nq, Dv), (G, Nq)


def _collision_counts(q_codes, k_codes, mask):
    """``m C``: the number of hashes in which ``q_i`` and kept ``k_j`` collide, (G, Nq, Nk)."""
    same = q_codes[:, :, None, :] == k_codes[:, None, :, :]                  # (G, Nq, Nk, m)
    counts = same.sum(axis=-1)                                               # (G, Nq, Nk)
    return counts if mask is None else np.where(mask[:, None, :], counts, 0)


def _dense_pairs_backward(du, v, q_unit, k_unit, A, W):
    """Steps 2-3 with a dense weight matrix: ``dv = A^T du``, ``dx = (du v^T) * W``."""
    dv = np.swapaxes(A, -1, -2) @ du                                         # (G, Nk, Dv)
    dx = (du @ np.swapaxes(v, -1, -2)) * W                                   # (G, Nq, Nk)
    dq_unit = dx @ k_unit                                                    # (G, Nq, D)
    dk_unit = np.swapaxes(dx, -1, -2) @ q_unit                               # (G, Nk, D)
    return dq_unit, dk_unit, dv


def _bucket_pairs_backward(du, v, q_unit, k_unit, q_codes, k_codes, mask, tau):
    counts = _collision_counts(q_codes, k_codes, mask).astype(du.dtype)      # (G, Nq, Nk)
    dq_unit, dk_unit, _ = _dense_pairs_backward(du, v, q_unit, k_unit, counts, counts)
    return dq_unit, dk_unit


def _expectation_backward(du, q_unit, k_unit, v, mask, tau, damping, grad):
    x = q_unit @ np.swapaxes(k_unit, -1, -2)                                 # (G, Nq, Nk)
    P = expectation_weights(x, tau, damping)                                 # (G, Nq, Nk)
    W = surrogate_weights(P, tau, damping) if grad == "surrogate" else exact_weights(x, tau, damping)
    if mask is not None:
        P = np.where(mask[:, None, :], P, 0.0)                               # (G, Nq, Nk)
        W = np.where(mask[:, None, :], W, 0.0)                               # (G, Nq, Nk)
    grads = _dense_pairs_backward(du, v, q_unit, k_unit, P, W)
    return tuple(g.astype(du.dtype, copy=False) for g in grads)


OPS = YosoOps(
    codes=lambda x, hyperplanes, hash_dtype: yoso_codes(x, hyperplanes, hash_dtype=hash_dtype),
    bucket_sum=_bucket_sum,
    expectation_sum=_expectation_sum,
    bucket_pairs_backward=_bucket_pairs_backward,
    expectation_backward=_expectation_backward,
)


# --------------------------------------------------------------------------------------
# The pipelines, shared by every backend
# --------------------------------------------------------------------------------------


def forward_pipeline(ops, q, k, v, *, mask, variant, tau, damping, normalize_output, num_hashes=None,
                     hash_dtype=None, hyperplanes=None, q_codes=None, k_codes=None, xp=np, **params):
    """The YOSO forward on flat ``(G, N, D)`` arrays, with a backend's ``ops``.

    Returns ``(y, res)``: ``res`` holds ``u_norm``, ``row_mass`` and
    ``empty_rows`` (G, Nq) and, sampled, the codes and hyperplanes.
    """
    k = zero_masked_rows(k, mask, xp)                                        # (G, Nk, D) step 0
    v = zero_masked_rows(v, mask, xp)                                        # (G, Nk, Dv)
    res = {}
    if variant == "expectation":
        q_unit, _ = unit_rows(q, xp)                                        # (G, Nq, D)
        k_unit, _ = unit_rows(k, xp)                                        # (G, Nk, D)
        u, row_mass = ops.expectation_sum(q_unit, k_unit, v, mask, tau, damping)   # (G, Nq, Dv), (G, Nq)
    else:
        if q_codes is None:                                                  # hash; the raw rows suffice
            q_codes = ops.codes(q, hyperplanes, hash_dtype)                  # (G, Nq, m)
            k_codes = ops.codes(k, hyperplanes, hash_dtype)                  # (G, Nk, m)
        else:
            q_codes, k_codes = xp.asarray(q_codes), xp.asarray(k_codes)
        sums, collisions = ops.bucket_sum(k_codes, v, mask, q_codes, tau)    # (G, Nq, Dv), (G, Nq)
        u = sums * v.dtype.type(1.0 / num_hashes)                            # (G, Nq, Dv) = C v
        row_mass = collisions / num_hashes                                   # (G, Nq)
        res.update(q_codes=q_codes, k_codes=k_codes, hyperplanes=hyperplanes)
    y, u_norm = normalize_output_rows(u, normalize_output, xp)               # (G, Nq, Dv), (G, Nq)
    # A NaN or inf row hashes to arbitrary codes (every comparison is false). With
    # check_finite=False non-finite inputs propagate, as in exact attention: the row of a
    # non-finite query, and every row of a slice with a non-finite kept key, is NaN.
    bad_k = ~xp.isfinite(k).all(axis=-1).all(axis=-1, keepdims=True)         # (G, 1)
    bad = ~xp.isfinite(q).all(axis=-1) | bad_k                               # (G, Nq)
    y = xp.where(bad[..., None], xp.asarray(np.nan, dtype=y.dtype), y)       # (G, Nq, Dv)
    res.update(u_norm=u_norm, row_mass=row_mass, empty_rows=row_mass == 0)
    return y, res


def backward_pipeline(ops, dout, q, k, v, out, res, *, mask, variant, tau, damping, normalize_output, grad,
                      num_hashes=None, xp=np, **params):
    """The YOSO backward (spec section 5) on flat arrays, with a backend's ``ops``.

    1. ``du`` from the output normalisation;
    2. ``dv = A^T du`` (the true derivative; sampled: with the codes fixed);
    3. ``dx = (du v^T) * W`` pushed to ``dq^ = dx k^`` and ``dk^ = dx^T q^``;
    4. through the input normalisation to ``dq`` and ``dk``.
    """
    du = output_normalization_backward(dout, out, res["u_norm"], normalize_output, xp)  # (G, Nq, Dv)
    k = zero_masked_rows(k, mask, xp)                                        # (G, Nk, D)
    v = zero_masked_rows(v, mask, xp)                                        # (G, Nk, Dv)
    q_unit, q_norm = unit_rows(q, xp)                                       # (G, Nq, D), (G, Nq)
    k_unit, k_norm = unit_rows(k, xp)                                       # (G, Nk, D), (G, Nk)
    if variant == "expectation" or grad == "expectation_surrogate":
        c = damping if variant == "expectation" else 1.0
        g = "surrogate" if grad == "expectation_surrogate" else grad
        dq_unit, dk_unit, dv = ops.expectation_backward(du, q_unit, k_unit, v, mask, tau, c, g)
    else:
        m = num_hashes
        sums, _ = ops.bucket_sum(res["q_codes"], du, None, res["k_codes"], tau)   # (G, Nk, Dv) = m C^T du
        dv = sums * du.dtype.type(1.0 / m)                                   # (G, Nk, Dv)
        dq_unit, dk_unit = ops.bucket_pairs_backward(du, v, q_unit, k_unit, res["q_codes"], res["k_codes"],
                                                     mask, tau)
        w = du.dtype.type(tau / (2.0 * m))                                   # W = (tau / 2) C
        dq_unit, dk_unit = dq_unit * w, dk_unit * w
    dq = input_normalization_backward(dq_unit, q_unit, q_norm, xp)           # (G, Nq, D)
    dk = input_normalization_backward(dk_unit, k_unit, k_norm, xp)           # (G, Nk, D)
    return dq, zero_masked_rows(dk, mask, xp), zero_masked_rows(dv, mask, xp)


def entry_points(ops, array_module=None):
    """A backend's ``forward`` and ``backward``: the pipelines run with its ``ops``.

    ``array_module(q)`` gives the pipelines' ``xp`` (NumPy when omitted).
    """

    def forward(q, k, v, *, mask, offset, scale, **params):
        xp = np if array_module is None else array_module(q)
        return forward_pipeline(ops, q, k, v, mask=mask, xp=xp, **params)

    def backward(dout, q, k, v, out, res, *, mask, offset, scale, **params):
        xp = np if array_module is None else array_module(q)
        return backward_pipeline(ops, dout, q, k, v, out, res, mask=mask, xp=xp, **params)

    return forward, backward


#: Backend entry points: the pipelines with the dense textbook ops.
forward, backward = entry_points(OPS)
