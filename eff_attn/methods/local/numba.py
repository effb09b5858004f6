"""Local attention on the CPU: a banded online-softmax kernel, O(Nq w) time and memory.

Matches :func:`eff_attn.methods.local.reference.local_reference`. No array
larger than one (Bq, Bk) tile per task is allocated.

Blocking
    ``prange`` over ``G x ceil(Nq / Bq)`` tasks; a task owns one query block
    ``[i0, i1)`` of one slice. Its queries' bands together cover the clipped
    key range ``[p_i0 - wL, p_(i1-1) + wR]``, walked in tiles of ``Bk`` keys
    with the online softmax of exact attention (running max ``mu``, sum
    ``l``, accumulator ``acc``). A tile wholly inside every row's band (the
    bulk of the range when ``w >> Bq``) needs no mask; only the edge tiles,
    and tiles under a key mask, get one. Tile products are ``np.dot`` into
    preallocated buffers, with BLAS held to one thread.

Backward
    Two passes without atomics, as in exact attention: one task per key
    block walks the query blocks whose bands reach it (``dk``, ``dv``); one
    task per query block walks its key range (``dq``). Both recompute
    ``P = exp(S - L)`` on the band from the saved logsumexp ``L``.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..._jit import blas_single_thread, contiguous, exp_shifted, kernel, serial
from ..exact import cpu_blocks
from ..exact.numba import _online_row_update, _score_gradient, _tile
from . import band, band_key_range, band_result

__all__ = ["forward", "backward"]

_band_key_range = serial(band_key_range)


@serial
def _tile_in_band(keep, i0, i1, j0, j1, o, wL, wR):
    """True when every pair of the tile rows [i0, i1) x keys [j0, j1) is in the band, with no key mask."""
    return keep.shape[0] == 0 and j0 >= i1 - 1 + o - wL and j1 - 1 <= i0 + o + wR


@serial
def _mask_band(s, keep, g, i0, i1, j0, o, wL, wR):
    """Set the entries of the score tile ``s`` (rows i0.., keys j0..) off the band or masked to -inf."""
    bq, bk = s.shape
    if _tile_in_band(keep, i0, i1, j0, j0 + bk, o, wL, wR):
        return
    has_mask = keep.shape[0] > 0
    for r in range(bq):
        p = i0 + r + o
        first = min(bk, max(0, p - wL - j0))                              # first in-band column
        stop = min(bk, max(0, p + wR + 1 - j0))                            # one past the last
        for c in range(bk):
            if c < first or c >= stop or (has_mask and not keep[g, j0 + c]):
                s[r, c] = -np.inf


@kernel
def _forward_kernel(q, k, v, keep, o, wL, wR, scale, block_q, block_k, out, lse, computed):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    n_blocks = (Nq + block_q - 1) // block_q
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = (task % n_blocks) * block_q
        i1 = min(Nq, i0 + block_q)
        bq = i1 - i0
        lo, hi = _band_key_range(i0, i1, o, wL, wR, Nk)                     # keys any row of the block sees
        computed[task] = bq * max(0, hi - lo)
        qs = q[g, i0:i1] * scale                                           # (Bq, D)
        mu = np.full(bq, -np.inf, dtype=q.dtype)                           # (Bq,)
        ell = np.zeros(bq, dtype=q.dtype)                                  # (Bq,)
        acc = np.zeros((bq, Dv), dtype=q.dtype)                            # (Bq, Dv)
        pv = np.empty((bq, Dv), dtype=q.dtype)                             # (Bq, Dv)
        tile = np.empty(bq * block_k, dtype=q.dtype)
        bits = np.empty(block_k, dtype=np.int32)
        # Invariant: acc[r] = sum_{seen j in band} exp(S[r, j] - mu[r]) v[j], ell[r] likewise.
        for j0 in range(lo, hi, block_k):
            j1 = min(hi, j0 + block_k)
            s = _tile(tile, bq, j1 - j0)                                   # (Bq, Bk)
            np.dot(qs, k[g, j0:j1].T, s)                                   # (Bq, Bk) scores
            _mask_band(s, keep, g, i0, i1, j0, o, wL, wR)
            for r in range(bq):
                mu_new, alpha, total = _online_row_update(s[r], mu[r], bits)
                if mu_new == -np.inf:                                      # nothing in band yet
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
def _band_probabilities(s, lse, keep, g, i0, j0, o, wL, wR, bits):
    """In place: ``s <- exp(s - L_i)`` on the band, 0 elsewhere."""
    _mask_band(s, keep, g, i0, i0 + s.shape[0], j0, o, wL, wR)
    for r in range(s.shape[0]):
        L = lse[g, i0 + r]
        if L == -np.inf:
            s[r, :] = 0
        else:
            exp_shifted(s[r], L, bits)


@kernel
def _backward_kv_kernel(q, k, v, dout, lse, delta, keep, o, wL, wR, scale, block_q, block_k, dk, dv):
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
        # Queries whose band reaches [j0, j1): p_i - wL <= j1 - 1 and p_i + wR >= j0.
        first = max(0, j0 - wR - o)
        stop = min(Nq, j1 - 1 + wL - o + 1)
        for i0 in range(first, stop, block_q):
            i1 = min(stop, i0 + block_q)
            p = _tile(p_buf, i1 - i0, bk)                                  # (Bq, Bk)
            ds = _tile(ds_buf, i1 - i0, bk)                                # (Bq, Bk)
            do = dout[g, i0:i1]                                            # (Bq, Dv)
            np.dot(q[g, i0:i1], ks.T, p)                                   # (Bq, Bk) scores
            _band_probabilities(p, lse, keep, g, i0, j0, o, wL, wR, bits)  # (Bq, Bk) P
            np.dot(p.T, do, dv_part)                                       # (Bk, Dv)
            dv_acc += dv_part
            np.dot(do, vb.T, ds)                                           # (Bq, Bk) dP
            _score_gradient(p, ds, delta, g, i0)                           # (Bq, Bk) dS
            np.dot(ds.T, q[g, i0:i1], dk_part)                             # (Bk, D)
            dk_acc += dk_part
        dk[g, j0:j1] = dk_acc * scale
        dv[g, j0:j1] = dv_acc


@kernel
def _backward_q_kernel(q, k, v, dout, lse, delta, keep, o, wL, wR, scale, block_q, block_k, dq):
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
        lo, hi = _band_key_range(i0, i1, o, wL, wR, Nk)
        for j0 in range(lo, hi, block_k):
            j1 = min(hi, j0 + block_k)
            p = _tile(p_buf, bq, j1 - j0)                                  # (Bq, Bk)
            ds = _tile(ds_buf, bq, j1 - j0)                                # (Bq, Bk)
            np.dot(qs, k[g, j0:j1].T, p)                                   # (Bq, Bk) scores
            _band_probabilities(p, lse, keep, g, i0, j0, o, wL, wR, bits)  # (Bq, Bk) P
            np.dot(do, v[g, j0:j1].T, ds)                                  # (Bq, Bk) dP
            _score_gradient(p, ds, delta, g, i0)                           # (Bq, Bk) dS
            np.dot(ds, k[g, j0:j1], dq_part)                               # (Bq, D)
            dq_acc += dq_part
        dq[g, i0:i1] = dq_acc * scale


def _prepare(q, k, v, mask, offset, window, block_q, block_k):
    """Contiguous inputs with masked keys zeroed, the band, the blocks and the kernel's mask argument."""
    q, k, v = contiguous(q, k, v)
    if mask is not None:                                                   # masked keys never enter the arithmetic
        k = np.where(mask[..., None], k, 0)
        v = np.where(mask[..., None], v, 0)
    keep = np.empty((0, 0), dtype=np.bool_) if mask is None else np.ascontiguousarray(mask)
    o, wL, wR = band(offset, q.shape[1], k.shape[1], window)
    block_q, block_k = cpu_blocks(q.shape[2], v.shape[2], block_q, block_k)
    return q, k, v, keep, (o, wL, wR), block_q, block_k


def forward(q, k, v, *, mask, offset, scale, window, block_q=None, block_k=None):
    """Banded online-softmax forward; see the module docstring."""
    q, k, v, keep, (o, wL, wR), block_q, block_k = _prepare(q, k, v, mask, offset, window, block_q, block_k)
    G, Nq, _ = q.shape
    out = np.empty((G, Nq, v.shape[2]), dtype=q.dtype)
    lse = np.empty((G, Nq), dtype=q.dtype)
    computed = np.zeros(G * -(-Nq // block_q), dtype=np.int64)
    with blas_single_thread():
        _forward_kernel(q, k, v, keep, o, wL, wR, q.dtype.type(scale), block_q, block_k, out, lse, computed)
    res = {"lse": lse, "block_q": block_q, "block_k": block_k}
    return out, band_result(res, mask, o, wL, wR, Nq, k.shape[1], np, computed.sum())


def backward(dout, q, k, v, out, res, *, mask, offset, scale, window, block_q=None, block_k=None):
    """Two-pass banded backward from the saved logsumexp."""
    q, k, v, keep, (o, wL, wR), block_q, block_k = _prepare(q, k, v, mask, offset, window, block_q, block_k)
    dout = np.ascontiguousarray(dout)
    delta = np.einsum("gid,gid->gi", dout, out)                              # (G, Nq)
    args = (q, k, v, dout, res["lse"], delta, keep, o, wL, wR, q.dtype.type(scale), block_q, block_k)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    with blas_single_thread():
        _backward_kv_kernel(*args, dk, dv)
        _backward_q_kernel(*args, dq)
    return dq, dk, dv
