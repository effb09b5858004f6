"""Nystrom attention on the CPU: three parallel Numba phases, no (Nq, Nk) array.

Matches :func:`eff_attn.methods.nystrom.reference.nystrom_reference`.

Phases
    1. ``prange`` over slices ``g``: the landmarks by direct segment sums
       (one pass over q and k) and ``A = softmax(q_hat k_hat^T)``; then, in
       a second kernel picked on the host, its pseudo-inverse ``Z``: the
       iteration's (m, m) products by ``np.dot`` into preallocated buffers,
       or an SVD; then the residual ``||A Z A - A||_F / ||A||_F``.
    2. ``prange`` over (slice, block of 16 landmarks): one (16, Nk) score
       block ``q_hat k~^T``, its masked row softmax, and ``B v`` for those
       landmarks. ``W = Z (B v)`` is then one batched (m, m) x (m, Dv)
       product per slice.
    3. ``prange`` over (slice, block of 64 queries): the (64, m) scores
       ``q~ k_hat^T``, their row softmax ``F`` and ``out = F W``.

    Phases 2 and 3 are one kernel, :func:`_softmax_attend_kernel`, on
    different operands.

Memory ``O(G m (D + Dv) + G m^2)`` plus one score block per worker.
Softmax rows use the vectorised :func:`eff_attn._jit.exp_shifted`. Kernels
are plain loops around ``np.dot`` (no array expressions), which compile in a
fraction of the time. There is
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
    m, D = bounds.shape[0] - 1, x.shape[1]
    for t in range(m):
        for d in range(D):
            out[t, d] = 0
        count = 0
        for j in range(bounds[t], bounds[t + 1]):
            if not use_keep or keep[j]:
                for d in range(D):
                    out[t, d] += x[j, d]
                count += 1
        valid[t] = count > 0
        if count > 0:
            f = factor / count
            for d in range(D):
                out[t, d] *= f


@serial
def _softmax_rows(s, row_ok, col_ok, bits):
    """In place: each row of ``s`` becomes its softmax over the ``col_ok`` entries.

    Rows with ``row_ok`` False, or with no allowed entry, become 0.
    """
    n = s.shape[1]
    for r in range(s.shape[0]):
        row = s[r]
        if not row_ok[r]:
            for c in range(n):
                row[c] = 0
            continue
        for c in range(n):
            if not col_ok[c]:
                row[c] = -np.inf
        mu = row_maximum(row)
        if mu == -np.inf:
            for c in range(n):
                row[c] = 0
            continue
        inv = 1 / exp_shifted(row, mu, bits)
        for c in range(n):
            row[c] *= inv


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
    zero = A.dtype.type(0)
    col_max = 0.0
    for j in range(m):
        col = zero
        for i in range(m):
            col += A[i, j]
        col_max = max(col_max, col)
    row_max = 0.0
    for i in range(m):
        row = zero
        for j in range(m):
            row += A[i, j]
        row_max = max(row_max, row)
    cr = col_max * row_max
    inv = 1 / cr if cr > 0 else 1.0
    for i in range(m):
        for j in range(m):
            Z[i, j] = A[j, i] * inv              # Z = A^T / (max col sum * max row sum)
    for _ in range(iters):
        np.dot(A, Z, T)                          # T = A Z
        for i in range(m):
            for j in range(m):
                U[i, j] = T[i, j]
        _shift_diagonal(U, 7)                    # U = 7I - T
        np.dot(T, U, V)
        _shift_diagonal(V, 15)                   # V = W = 15I - T U
        np.dot(T, V, U)
        _shift_diagonal(U, 13)                   # U = Pi = 13I - T W
        np.dot(Z, U, V)
        for i in range(m):
            for j in range(m):
                Z[i, j] = V[i, j] * 0.25         # Z <- Z Pi / 4


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
def _landmark_kernel(q, k, keep, mask_queries, bounds_q, bounds_k, a_q, a_k, q_hat, k_hat, valid_q, valid_k, A):
    """Per slice: the landmark means ``q_hat``, ``k_hat`` and ``A = softmax(q_hat k_hat^T)`` (G, m, m)."""
    G, Nq, D = q.shape
    m = q_hat.shape[1]
    has_mask = keep.shape[0] > 0
    no_keep = np.empty(0, dtype=np.bool_)
    for g in prange(G):
        keep_g = keep[g] if has_mask else no_keep
        _segment_means(q[g], keep_g, has_mask and mask_queries, bounds_q, a_q, q_hat[g], valid_q[g])
        _segment_means(k[g], keep_g, has_mask, bounds_k, a_k, k_hat[g], valid_k[g])
        np.dot(q_hat[g], k_hat[g].T, A[g])                                 # (m, m) scores
        _softmax_rows(A[g], valid_q[g], valid_k[g], np.empty(m, dtype=np.int32))


@serial
def _pinv_residual(A, Z, T, U):
    """``||A Z A - A||_F / ||A||_F`` (0 for ``A = 0``); T, U (m, m) are scratch."""
    m = A.shape[0]
    np.dot(A, Z, T)
    np.dot(T, A, U)                                                        # A Z A
    num = 0.0
    den = 0.0
    for i in range(m):
        for j in range(m):
            num += (U[i, j] - A[i, j]) ** 2
            den += A[i, j] ** 2
    return np.sqrt(num / den) if den > 0 else 0.0


@kernel
def _iterative_pinv_kernel(A, iters, Z, residual):
    """Per slice: ``Z[g]`` <- the iterative pseudo-inverse of ``A[g]``, and its residual."""
    G, m = A.shape[0], A.shape[1]
    for g in prange(G):
        T = np.empty((m, m), dtype=A.dtype)
        U = np.empty((m, m), dtype=A.dtype)
        V = np.empty((m, m), dtype=A.dtype)
        _iterative_pinv(A[g], iters, Z[g], T, U, V)
        residual[g] = _pinv_residual(A[g], Z[g], T, U)


@kernel
def _exact_pinv_kernel(A, eps, Z, residual):
    """Per slice: ``Z[g]`` <- the SVD pseudo-inverse of ``A[g]``, and its residual.

    A kernel of its own (chosen on the host), so that the default iterative
    mode never compiles the SVD.
    """
    G, m = A.shape[0], A.shape[1]
    for g in prange(G):
        _exact_pinv(A[g], eps, Z[g])
        residual[g] = _pinv_residual(A[g], Z[g], np.empty((m, m), dtype=A.dtype), np.empty((m, m), dtype=A.dtype))


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
        xs = np.empty((i1 - i0, x.shape[2]), dtype=x.dtype)               # (B, D) factor x
        for r in range(i1 - i0):
            for d in range(x.shape[2]):
                xs[r, d] = x[g, i0 + r, d] * factor
        s = np.empty((i1 - i0, Nk), dtype=x.dtype)
        np.dot(xs, keys[g].T, s)                                           # (B, Nk) scores
        _softmax_rows(s, row_ok[g, i0:i1], col_ok[g], np.empty(Nk, dtype=np.int32))
        np.dot(s, values[g], out[g, i0:i1])                                # (B, Dv)


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
    A = np.empty((G, m, m), dtype=q.dtype)
    Z = np.empty((G, m, m), dtype=q.dtype)
    residual = np.empty(G, dtype=q.dtype)
    BV = np.empty((G, m, Dv), dtype=q.dtype)
    out = np.empty((G, Nq, Dv), dtype=q.dtype)
    with blas_single_thread():
        _landmark_kernel(q, k, keep, Nq == Nk, segment_bounds(Nq, m), segment_bounds(Nk, m), a_q, a_k,
                         q_hat, k_hat, valid_q, valid_k, A)
        if pinv == "exact":
            _exact_pinv_kernel(A, float(np.finfo(q.dtype).eps), Z, residual)
        else:
            _iterative_pinv_kernel(A, pinv_iters, Z, residual)
        kept = np.ones((G, Nk), dtype=np.bool_) if mask is None else keep  # (G, Nk)
        _softmax_attend_kernel(q_hat, k, v, a_k, valid_q, kept, LANDMARK_BLOCK, BV)          # B v
        W = np.ascontiguousarray(Z @ BV)                                                      # (G, m, Dv)
        _softmax_attend_kernel(q, k_hat, W, a_q, np.ones((G, Nq), dtype=np.bool_), valid_k,
                               QUERY_BLOCK, out)                                              # F W
    return out, {"valid_q": valid_q, "valid_k": valid_k, "pinv_residual": residual}
