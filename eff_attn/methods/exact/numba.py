"""Exact attention on the CPU: blocked, parallel, streaming Numba kernels.

Matches :func:`eff_attn.methods.exact.reference.exact_blocked`. No array of
size Nq x Nk is ever allocated: each task holds one (Bq, Bk) score tile.

Blocking
    ``prange`` over ``G x ceil(Nq / Bq)`` tasks; a task owns one query block
    of one slice and its private running max ``mu``, sum ``l`` and
    accumulator ``acc``. Tile products are ``np.dot`` through SciPy's BLAS
    into preallocated buffers, held to one thread while ``prange`` owns the
    cores. Tiles are sized for OpenBLAS's small-matrix path
    (:func:`eff_attn.methods.exact.cpu_blocks`); the exponentials use the
    vectorised :func:`eff_attn._jit.exp_shifted`.

Backward
    Two passes and no atomics: one task per key block accumulates that
    block's ``dk`` and ``dv`` over all query blocks; one task per query block
    accumulates ``dq`` over all key blocks. Both recompute ``P = exp(S - L)``
    from the saved logsumexp ``L``.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..._jit import blas_single_thread, contiguous, exp_shifted, kernel, row_maximum, serial
from . import cpu_blocks

__all__ = ["forward", "backward"]


@serial
def _tile(buffer, rows, cols):
    """A C-contiguous (rows, cols) view of the front of a flat buffer."""
    return buffer[: rows * cols].reshape((rows, cols))


@serial
def _mask_tile(s, keep, g, i0, j0, causal, offset):
    """Set invisible entries of the score tile ``s`` (rows i0.., keys j0..) to -inf."""
    bq, bk = s.shape
    has_mask = keep.shape[0] > 0
    for r in range(bq):
        limit = bk if not causal else min(bk, max(0, i0 + r + offset + 1 - j0))
        for c in range(bk):
            if c >= limit or (has_mask and not keep[g, j0 + c]):
                s[r, c] = -np.inf


@serial
def _needs_mask(keep, causal, offset, i0, j1):
    """True unless the tile is wholly visible (no mask, below the causal diagonal)."""
    return keep.shape[0] > 0 or (causal and j1 - 1 > i0 + offset)


@serial
def _online_row_update(row, mu_old, bits):
    """One online-softmax step on a row of scores, in place.

    Returns ``(mu_new, alpha, row_sum)`` with ``row <- exp(row - mu_new)`` and
    ``alpha = exp(mu_old - mu_new)``. A row with nothing visible so far keeps
    ``mu = -inf`` and becomes 0. All arithmetic stays in the row's dtype.
    """
    mu_new = max(mu_old, row_maximum(row))
    if mu_new == -np.inf:
        row[:] = 0
        return mu_new, mu_new, mu_new
    total = exp_shifted(row, mu_new, bits)
    return mu_new, np.exp(mu_old - mu_new), total


@kernel
def _forward_kernel(q, k, v, keep, causal, offset, scale, block_q, block_k, out, lse):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    n_blocks = (Nq + block_q - 1) // block_q
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = (task % n_blocks) * block_q
        i1 = min(Nq, i0 + block_q)
        bq = i1 - i0
        qs = q[g, i0:i1] * scale                                           # (Bq, D)
        mu = np.full(bq, -np.inf, dtype=q.dtype)                           # (Bq,)
        ell = np.zeros(bq, dtype=q.dtype)                                  # (Bq,)
        acc = np.zeros((bq, Dv), dtype=q.dtype)                            # (Bq, Dv)
        pv = np.empty((bq, Dv), dtype=q.dtype)                             # (Bq, Dv)
        tile = np.empty(bq * block_k, dtype=q.dtype)
        bits = np.empty(block_k, dtype=np.int32)
        k_end = Nk if not causal else min(Nk, max(0, i1 + offset))
        # Invariant: acc[r] = sum_{seen j} exp(S[r, j] - mu[r]) v[j], ell[r] likewise.
        for j0 in range(0, k_end, block_k):
            j1 = min(k_end, j0 + block_k)
            s = _tile(tile, bq, j1 - j0)                                   # (Bq, Bk)
            np.dot(qs, k[g, j0:j1].T, s)                                   # (Bq, Bk) scores
            if _needs_mask(keep, causal, offset, i0, j1):
                _mask_tile(s, keep, g, i0, j0, causal, offset)
            for r in range(bq):
                mu_new, alpha, total = _online_row_update(s[r], mu[r], bits)
                if mu_new == -np.inf:                                      # nothing visible yet
                    continue
                ell[r] = alpha * ell[r] + total
                if alpha != 1:
                    acc[r] *= alpha
                mu[r] = mu_new
            np.dot(s, v[g, j0:j1], pv)                                     # (Bq, Dv) P_J v_J
            acc += pv
        for r in range(bq):
            if ell[r] > 0:
                out[g, i0 + r] = acc[r] / ell[r]
                lse[g, i0 + r] = mu[r] + np.log(ell[r])
            else:
                out[g, i0 + r] = 0
                lse[g, i0 + r] = -np.inf


@serial
def _probabilities(s, lse, keep, g, i0, j0, causal, offset, bits):
    """In place: ``s <- exp(s - L_i)`` on visible entries, 0 elsewhere."""
    if _needs_mask(keep, causal, offset, i0, j0 + s.shape[1]):
        _mask_tile(s, keep, g, i0, j0, causal, offset)
    for r in range(s.shape[0]):
        L = lse[g, i0 + r]
        if L == -np.inf:
            s[r, :] = 0
        else:
            exp_shifted(s[r], L, bits)


@serial
def _score_gradient(p, dp, delta, g, i0):
    """In place ``dp <- p * (dp - delta_i)``: the gradient dS of the scores."""
    for r in range(p.shape[0]):
        d = delta[g, i0 + r]
        for c in range(p.shape[1]):
            dp[r, c] = p[r, c] * (dp[r, c] - d)


@kernel
def _backward_kv_kernel(q, k, v, dout, lse, delta, keep, causal, offset, scale, block_q, block_k, dk, dv):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    n_blocks = (Nk + block_k - 1) // block_k
    for task in prange(G * n_blocks):
        g = task // n_blocks
        j0 = (task % n_blocks) * block_k
        j1 = min(Nk, j0 + block_k)
        bk = j1 - j0
        ks = k[g, j0:j1] * scale                                           # (Bk, D)
        vb = v[g, j0:j1]                                                   # (Bk, Dv)
        dk_acc = np.zeros((bk, D), dtype=q.dtype)                          # (Bk, D)
        dv_acc = np.zeros((bk, Dv), dtype=q.dtype)                         # (Bk, Dv)
        dk_part = np.empty((bk, D), dtype=q.dtype)
        dv_part = np.empty((bk, Dv), dtype=q.dtype)
        p_buf = np.empty(block_q * bk, dtype=q.dtype)
        ds_buf = np.empty(block_q * bk, dtype=q.dtype)
        bits = np.empty(bk, dtype=np.int32)
        first = 0 if not causal else max(0, j0 - offset)                   # first i with i + offset >= j0
        for i0 in range(first, Nq, block_q):
            i1 = min(Nq, i0 + block_q)
            p = _tile(p_buf, i1 - i0, bk)                                  # (Bq, Bk)
            ds = _tile(ds_buf, i1 - i0, bk)                                # (Bq, Bk)
            do = dout[g, i0:i1]                                            # (Bq, Dv)
            np.dot(q[g, i0:i1], ks.T, p)                                   # (Bq, Bk) scores
            _probabilities(p, lse, keep, g, i0, j0, causal, offset, bits)  # (Bq, Bk) P
            np.dot(p.T, do, dv_part)                                       # (Bk, Dv)
            dv_acc += dv_part
            np.dot(do, vb.T, ds)                                           # (Bq, Bk) dP
            _score_gradient(p, ds, delta, g, i0)                           # (Bq, Bk) dS
            np.dot(ds.T, q[g, i0:i1], dk_part)                             # (Bk, D)
            dk_acc += dk_part
        dk[g, j0:j1] = dk_acc * scale
        dv[g, j0:j1] = dv_acc


@kernel
def _backward_q_kernel(q, k, v, dout, lse, delta, keep, causal, offset, scale, block_q, block_k, dq):
    G, Nq, D = q.shape
    Nk = k.shape[1]
    n_blocks = (Nq + block_q - 1) // block_q
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = (task % n_blocks) * block_q
        i1 = min(Nq, i0 + block_q)
        bq = i1 - i0
        qs = q[g, i0:i1] * scale                                           # (Bq, D)
        do = dout[g, i0:i1]                                                # (Bq, Dv)
        dq_acc = np.zeros((bq, D), dtype=q.dtype)                          # (Bq, D)
        dq_part = np.empty((bq, D), dtype=q.dtype)
        p_buf = np.empty(bq * block_k, dtype=q.dtype)
        ds_buf = np.empty(bq * block_k, dtype=q.dtype)
        bits = np.empty(block_k, dtype=np.int32)
        k_end = Nk if not causal else min(Nk, max(0, i1 + offset))
        for j0 in range(0, k_end, block_k):
            j1 = min(k_end, j0 + block_k)
            p = _tile(p_buf, bq, j1 - j0)                                  # (Bq, Bk)
            ds = _tile(ds_buf, bq, j1 - j0)                                # (Bq, Bk)
            np.dot(qs, k[g, j0:j1].T, p)                                   # (Bq, Bk) scores
            _probabilities(p, lse, keep, g, i0, j0, causal, offset, bits)  # (Bq, Bk) P
            np.dot(do, v[g, j0:j1].T, ds)                                  # (Bq, Bk) dP
            _score_gradient(p, ds, delta, g, i0)                           # (Bq, Bk) dS
            np.dot(ds, k[g, j0:j1], dq_part)                               # (Bq, D)
            dq_acc += dq_part
        dq[g, i0:i1] = dq_acc * scale


def _kernel_args(q, mask, offset, scale):
    keep = np.empty((0, 0), dtype=np.bool_) if mask is None else np.ascontiguousarray(mask)
    return keep, offset is not None, 0 if offset is None else int(offset), q.dtype.type(scale)


def forward(q, k, v, *, mask, offset, scale, algorithm="auto", block_q=None, block_k=None):
    """Blocked online-softmax forward; see the module docstring."""
    q, k, v = contiguous(q, k, v)
    block_q, block_k = cpu_blocks(q.shape[2], v.shape[2], block_q, block_k)
    G, Nq, _ = q.shape
    out = np.empty((G, Nq, v.shape[2]), dtype=q.dtype)
    lse = np.empty((G, Nq), dtype=q.dtype)
    with blas_single_thread():
        _forward_kernel(q, k, v, *_kernel_args(q, mask, offset, scale), block_q, block_k, out, lse)
    return out, {"lse": lse, "algorithm": "blocked", "block_q": block_q, "block_k": block_k}


def backward(dout, q, k, v, out, res, *, mask, offset, scale, block_q=None, block_k=None, **params):
    """Two-pass blocked backward from the saved logsumexp."""
    q, k, v, dout = contiguous(q, k, v, dout)
    block_q, block_k = cpu_blocks(q.shape[2], v.shape[2], block_q, block_k)
    delta = np.einsum("gid,gid->gi", dout, out)                              # (G, Nq)
    args = (q, k, v, dout, res["lse"], delta, *_kernel_args(q, mask, offset, scale), block_q, block_k)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    with blas_single_thread():
        _backward_kv_kernel(*args, dk, dv)
        _backward_q_kernel(*args, dq)
    return dq, dk, dv
