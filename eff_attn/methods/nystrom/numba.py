"""Nystrom attention on the CPU: three parallel Numba phases, no (Nq, Nk) array.

Matches :func:`eff_attn.methods.nystrom.reference.nystrom_reference`.

Phases
    1. ``prange`` over slices ``g``: the landmarks by direct segment sums
       (one pass over q and k), ``A = softmax(q_hat k_hat^T)``, and its
       pseudo-inverse ``Z``: the iteration's (m, m) products by ``np.dot``
       into four preallocated buffers, or an SVD; then the residual
       ``||A Z A - A||_F / ||A||_F``.
    2. ``prange`` over (slice, block of 16 landmarks): one (16, Nk) score
       block ``q_hat k~^T``, its masked row softmax, and ``B v`` for those
       landmarks. ``W = Z (B v)`` is then one batched (m, m) x (m, Dv)
       product per slice.
    3. ``prange`` over (slice, block of 64 queries): the (64, m) scores
       ``q~ k_hat^T``, their row softmax ``F`` and ``out = F W``.

    Phases 2 and 3 are one kernel, :func:`_softmax_attend_kernel`, on
    different operands.

Memory ``O(G m (D + Dv) + G m^2)`` plus one score block per worker.
Softmax rows use the vectorised :func:`eff_attn._jit.exp_shifted`. There is
no backward pass here (the Impl declares ``differentiable=False``):
``attention_vjp`` runs the NumPy or CuPy pullback.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..._jit import blas_single_thread, contiguous, exp_shifted, kernel, row_maximum, serial
from ...masks import as_kernel_mask
from ._common import input_scales, segment_bounds

__all__ = ["forward"]

#: Landmarks per task in phase 2; the (16, Nk) score block is the working set.
LANDMARK_BLOCK = 16
#: Queries per task in phase 3.
QUERY_BLOCK = 64


@serial
def _segment_means(x, keep, use_keep, bounds, factor, out, valid):
    """``out[t] = factor * mean of the kept rows of x in [bounds[t], bounds[t+1])``."""
    m = bounds.shape[0] - 1
    for t in range(m):
        out[t] = 0
        count = 0
        for j in range(bounds[t], bounds[t + 1]):
            if not use_keep or keep[j]:
                out[t] += x[j]
                count += 1
        valid[t] = count > 0
        if count > 0:
            out[t] *= factor / count


@serial
def _softmax_rows(s, row_ok, col_ok, bits):
    """In place: each row of ``s`` becomes its softmax over the ``col_ok`` entries.

    Rows with ``row_ok`` False, or with no allowed entry, become 0.
    """
    for r in range(s.shape[0]):
        row = s[r]
        if not row_ok[r]:
            row[:] = 0
            continue
        for c in range(row.shape[0]):
            if not col_ok[c]:
                row[c] = -np.inf
        mu = row_maximum(row)
        if mu == -np.inf:
            row[:] = 0
            continue
        total = exp_shifted(row, mu, bits)
        row *= 1 / total


@serial
def _shift_diagonal(x, c):
    """In place ``x <- c I - x``."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            x[i, j] = -x[i, j]
        x[i, i] += c


@serial
def _iterative_pinv(A, iters, Z, T, U, V):
    """``Z`` <- the iterative pseudo-inverse of ``A`` (see the reference); T, U, V are scratch."""
    m = A.shape[0]
    col_max = 0.0
    for j in range(m):
        col_max = max(col_max, A[:, j].sum())
    row_max = 0.0
    for i in range(m):
        row_max = max(row_max, A[i].sum())
    cr = col_max * row_max
    Z[:] = A.T
    if cr > 0:
        Z *= 1 / cr
    for _ in range(iters):
        np.dot(A, Z, T)                          # T = A Z
        U[:] = T
        _shift_diagonal(U, 7)                    # U = 7I - T
        np.dot(T, U, V)
        _shift_diagonal(V, 15)                   # V = W = 15I - T U
        np.dot(T, V, U)
        _shift_diagonal(U, 13)                   # U = Pi = 13I - T W
        np.dot(Z, U, V)
        Z[:] = V
        Z *= 0.25                                # Z <- Z Pi / 4


@serial
def _exact_pinv(A, eps, Z):
    """``Z`` <- the SVD pseudo-inverse of ``A``, in float64, cutoff ``m eps sigma_max``."""
    m = A.shape[0]
    U, sigma, Vh = np.linalg.svd(A.astype(np.float64))
    cutoff = m * eps * sigma.max()
    for i in range(m):
        inv = 1 / sigma[i] if sigma[i] > cutoff else 0.0
        for j in range(m):
            Vh[i, j] *= inv
    Z[:] = np.dot(Vh.T, U.T)


@kernel
def _landmark_kernel(q, k, keep, mask_queries, bounds_q, bounds_k, a_q, a_k, exact, eps, iters,
                     q_hat, k_hat, valid_q, valid_k, Z, residual):
    G, Nq, D = q.shape
    m = q_hat.shape[1]
    has_mask = keep.shape[0] > 0
    no_keep = np.empty(0, dtype=np.bool_)
    for g in prange(G):
        keep_g = keep[g] if has_mask else no_keep
        _segment_means(q[g], keep_g, has_mask and mask_queries, bounds_q, a_q, q_hat[g], valid_q[g])
        _segment_means(k[g], keep_g, has_mask, bounds_k, a_k, k_hat[g], valid_k[g])
        A = np.empty((m, m), dtype=q.dtype)
        np.dot(q_hat[g], k_hat[g].T, A)                                    # (m, m) scores
        _softmax_rows(A, valid_q[g], valid_k[g], np.empty(m, dtype=np.int32))
        T = np.empty((m, m), dtype=q.dtype)
        U = np.empty((m, m), dtype=q.dtype)
        V = np.empty((m, m), dtype=q.dtype)
        if exact:
            _exact_pinv(A, eps, Z[g])
        else:
            _iterative_pinv(A, iters, Z[g], T, U, V)
        np.dot(A, Z[g], T)
        np.dot(T, A, U)                                                    # A Z A
        num = 0.0
        den = 0.0
        for i in range(m):
            for j in range(m):
                num += (U[i, j] - A[i, j]) ** 2
                den += A[i, j] ** 2
        residual[g] = np.sqrt(num / den) if den > 0 else 0.0


@kernel
def _softmax_attend_kernel(x, keys, values, factor, row_ok, col_ok, block, out):
    """``out[g, i] = softmax_j(factor x_i . keys_j) values_j`` over ``col_ok`` keys.

    Rows with ``row_ok`` False, or with no allowed key, are 0. One task per
    (slice, block of rows): a (block, Nk) score tile, its softmax, one product.
    Phase 2 runs it as ``(q_hat, k, v)``, phase 3 as ``(q, k_hat, W)``.
    """
    G, N, _ = x.shape
    Nk, Dv = keys.shape[1], values.shape[2]
    n_blocks = (N + block - 1) // block
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = (task % n_blocks) * block
        i1 = min(N, i0 + block)
        s = np.empty((i1 - i0, Nk), dtype=x.dtype)
        np.dot(x[g, i0:i1] * factor, keys[g].T, s)                        # (B, Nk) scores
        _softmax_rows(s, row_ok[g, i0:i1], col_ok[g], np.empty(Nk, dtype=np.int32))
        o = np.empty((i1 - i0, Dv), dtype=x.dtype)
        np.dot(s, values[g], o)                                            # (B, Dv)
        out[g, i0:i1] = o


def forward(q, k, v, *, mask, offset, scale, num_landmarks, pinv="iterative", pinv_iters=6):
    """Three-phase forward; see the module docstring."""
    q, k, v = contiguous(q, k, v)
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    m = num_landmarks
    a_q, a_k = (q.dtype.type(a) for a in input_scales(scale))
    keep = as_kernel_mask(mask)
    q_hat = np.empty((G, m, D), dtype=q.dtype)
    k_hat = np.empty((G, m, D), dtype=q.dtype)
    valid_q = np.empty((G, m), dtype=np.bool_)
    valid_k = np.empty((G, m), dtype=np.bool_)
    Z = np.empty((G, m, m), dtype=q.dtype)
    residual = np.empty(G, dtype=q.dtype)
    BV = np.empty((G, m, Dv), dtype=q.dtype)
    out = np.empty((G, Nq, Dv), dtype=q.dtype)
    with blas_single_thread():
        _landmark_kernel(q, k, keep, Nq == Nk, segment_bounds(Nq, m), segment_bounds(Nk, m), a_q, a_k,
                         pinv == "exact", float(np.finfo(q.dtype).eps), pinv_iters,
                         q_hat, k_hat, valid_q, valid_k, Z, residual)
        kept = np.ones((G, Nk), dtype=np.bool_) if mask is None else keep  # (G, Nk)
        _softmax_attend_kernel(q_hat, k, v, a_k, valid_q, kept, LANDMARK_BLOCK, BV)          # B v
        W = np.ascontiguousarray(Z @ BV)                                                      # (G, m, Dv)
        _softmax_attend_kernel(q, k_hat, W, a_q, np.ones((G, Nq), dtype=np.bool_), valid_k,
                               QUERY_BLOCK, out)                                              # F W
    return out, {"valid_q": valid_q, "valid_k": valid_k, "pinv_residual": residual}
