"""The blocked online softmax on the CPU: parallel, streaming Numba kernels over a band of keys.

The kernels of exact attention (the band that covers every visible key) and of
local attention (a window); exact attention's results match
:func:`eff_attn.methods.exact.reference.exact_blocked`. No array of
size Nq x Nk is ever allocated: each task holds one (Bq, Bk) score tile.

Blocking
    ``prange`` over ``G x ceil(Nq / Bq)`` tasks; a task owns one query block
    of one slice and its private running max ``mu``, sum ``l`` and
    accumulator ``acc``. Within a slice the tasks take the query blocks short
    and long in turn (:func:`_paired`), so that the threads' contiguous runs of
    tasks cost the same under a causal mask. Tile products are ``np.dot`` through SciPy's BLAS
    into preallocated buffers, held to one thread while ``prange`` owns the
    cores. Tiles are sized to stay in a core's L2 cache
    (:func:`eff_attn._tile_sizes.cpu_blocks`); the exponentials use the
    vectorised :func:`eff_attn._jit.exp_shifted`.

Backward
    No atomics; every tile recomputes ``P = exp(S - L)`` from the saved
    logsumexp ``L`` and ``delta_i = dO_i . O_i``. When the slices fill the
    threads (``G`` a multiple of, or at least twice, the thread count), one
    task per slice walks the key blocks in order, completing each block's
    ``dk`` and ``dv`` and adding its share to the slice's ``dq`` (FlashAttention-2
    order: five tile products). Otherwise two passes split the work finer: one
    task per key block accumulates that block's ``dk`` and ``dv`` over all query
    blocks, one task per query block accumulates ``dq`` over all key blocks
    (seven products, since both recompute ``S`` and ``dP``).

Bands
    The kernels attend over a band of positions: query ``i`` at ``p_i = i + o``
    sees the kept keys ``p_i - wL <= j <= p_i + wR``. Exact attention is the
    band that covers every visible key (:func:`full_band`: ``wR = 0`` under
    causal attention, the whole key range otherwise); ``local`` attention
    runs the same kernels with its window. A task walks only the key range its
    rows' bands reach, and masks only the tiles that cross a band edge.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ._jit import blas_single_thread, contiguous, exp_shifted, kernel, serial
from ._tiles import add_into, finish_row, online_softmax_step, scale_rows, set_zero, start_rows, store_scaled
from ._tile_sizes import EXACT_BLOCK_Q_CPU, EXACT_TILE_MACS, cpu_blocks
from .masks import as_kernel_mask

__all__ = ["blocked_forward", "blocked_backward", "full_band", "banded_forward", "banded_backward"]


@serial
def _tile(buffer, rows, cols):
    """A C-contiguous (rows, cols) view of the front of a flat buffer."""
    return buffer[: rows * cols].reshape((rows, cols))


@serial
def _paired(task, n_blocks):
    """Block index of ``task``'s place in the order 0, n-1, 1, n-2, ...: a short and a long block in turn.

    ``prange`` hands each thread a contiguous run of tasks; under a causal mask
    query block ``b`` costs about ``b + 1`` tiles, so in this order every run
    holds as many long blocks as short ones, even for a single slice.
    """
    b = task % n_blocks
    return b // 2 if b % 2 == 0 else n_blocks - 1 - b // 2


@serial
def _key_range(i0, i1, o, wL, wR, Nk):
    """Keys ``[lo, hi)`` that the bands of queries ``[i0, i1)`` reach (empty when ``hi <= lo``)."""
    return max(0, i0 + o - wL), min(Nk, i1 - 1 + o + wR + 1)


@serial
def _query_range(j0, j1, o, wL, wR, Nq):
    """Queries ``[first, stop)`` whose bands reach keys ``[j0, j1)``."""
    return max(0, j0 - wR - o), min(Nq, j1 - 1 + wL - o + 1)


@serial
def _mask_tile(s, keep, g, i0, j0, o, wL, wR):
    """Set the entries of the score tile ``s`` (rows i0.., keys j0..) off the band or masked to -inf.

    Does nothing when every pair of the tile is in the band and no key mask applies.
    """
    bq, bk = s.shape
    has_mask = keep.shape[0] > 0
    if not has_mask and j0 >= i0 + bq - 1 + o - wL and j0 + bk - 1 <= i0 + o + wR:
        return
    for r in range(bq):
        p = i0 + r + o
        first = min(bk, max(0, p - wL - j0))                               # first column in the band
        stop = min(bk, max(first, p + wR + 1 - j0))                        # one past the last
        for c in range(first):                                             # keys before the band
            s[r, c] = -np.inf
        for c in range(stop, bk):                                          # keys after it
            s[r, c] = -np.inf
        if has_mask:
            for c in range(first, stop):
                if not keep[g, j0 + c]:
                    s[r, c] = -np.inf


@kernel
def _forward_kernel(q, k, v, keep, o, wL, wR, scale, block_q, block_k, out, lse):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    n_blocks = (Nq + block_q - 1) // block_q
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = _paired(task, n_blocks) * block_q
        i1 = min(Nq, i0 + block_q)
        bq = i1 - i0
        qs = np.empty((bq, D), dtype=q.dtype)                              # (Bq, D)
        mu = np.empty(bq, dtype=q.dtype)                                   # (Bq,)
        ell = np.empty(bq, dtype=q.dtype)                                  # (Bq,)
        acc = np.empty((bq, Dv), dtype=q.dtype)                            # (Bq, Dv)
        pv = np.empty((bq, Dv), dtype=q.dtype)                             # (Bq, Dv)
        start_rows(q, g, i0, scale, qs, mu, ell, acc)                      # qs = q_I scale, mu = -inf, 0, 0
        tile = np.empty(bq * block_k, dtype=q.dtype)
        bits = np.empty(block_k, dtype=np.int32)
        lo, hi = _key_range(i0, i1, o, wL, wR, Nk)
        # Invariant: acc[r] = sum_{seen j} exp(S[r, j] - mu[r]) v[j], ell[r] likewise.
        for j0 in range(lo, hi, block_k):
            j1 = min(hi, j0 + block_k)
            s = _tile(tile, bq, j1 - j0)                                   # (Bq, Bk)
            np.dot(qs, k[g, j0:j1].T, s)                                   # (Bq, Bk) scores
            _mask_tile(s, keep, g, i0, j0, o, wL, wR)
            online_softmax_step(s, mu, ell, acc, bits)                     # s <- exp(s - mu), rescale
            np.dot(s, v[g, j0:j1], pv)                                     # (Bq, Dv) P_J v_J
            add_into(acc, pv)                                              # acc += pv
        for r in range(bq):
            lse[g, i0 + r] = finish_row(acc[r], ell[r], mu[r], out[g, i0 + r])


@serial
def _probabilities(s, lse, keep, g, i0, j0, o, wL, wR, bits):
    """In place: ``s <- exp(s - L_i)`` on visible entries, 0 elsewhere."""
    _mask_tile(s, keep, g, i0, j0, o, wL, wR)
    for r in range(s.shape[0]):
        L = lse[g, i0 + r]
        if L == -np.inf:
            for c in range(s.shape[1]):
                s[r, c] = 0
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
def _backward_kv_kernel(q, k, v, dout, lse, delta, keep, o, wL, wR, scale, block_q, block_k, dk, dv):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    n_blocks = (Nk + block_k - 1) // block_k
    for task in prange(G * n_blocks):
        g = task // n_blocks
        j0 = _paired(task, n_blocks) * block_k
        j1 = min(Nk, j0 + block_k)
        bk = j1 - j0
        ks = np.empty((bk, D), dtype=q.dtype)                              # (Bk, D)
        scale_rows(k, g, j0, scale, ks)                                    # k_J scale
        vb = v[g, j0:j1]                                                   # (Bk, Dv)
        dk_acc = np.empty((bk, D), dtype=q.dtype)                          # (Bk, D)
        dv_acc = np.empty((bk, Dv), dtype=q.dtype)                         # (Bk, Dv)
        set_zero(dk_acc)
        set_zero(dv_acc)
        dk_part = np.empty((bk, D), dtype=q.dtype)
        dv_part = np.empty((bk, Dv), dtype=q.dtype)
        p_buf = np.empty(block_q * bk, dtype=q.dtype)
        ds_buf = np.empty(block_q * bk, dtype=q.dtype)
        bits = np.empty(bk, dtype=np.int32)
        first, stop = _query_range(j0, j1, o, wL, wR, Nq)                  # queries whose bands reach [j0, j1)
        for i0 in range(first, stop, block_q):
            i1 = min(stop, i0 + block_q)
            p = _tile(p_buf, i1 - i0, bk)                                  # (Bq, Bk)
            ds = _tile(ds_buf, i1 - i0, bk)                                # (Bq, Bk)
            do = dout[g, i0:i1]                                            # (Bq, Dv)
            np.dot(q[g, i0:i1], ks.T, p)                                   # (Bq, Bk) scores
            _probabilities(p, lse, keep, g, i0, j0, o, wL, wR, bits)       # (Bq, Bk) P
            np.dot(p.T, do, dv_part)                                       # (Bk, Dv)
            add_into(dv_acc, dv_part)
            np.dot(do, vb.T, ds)                                           # (Bq, Bk) dP
            _score_gradient(p, ds, delta, g, i0)                           # (Bq, Bk) dS
            np.dot(ds.T, q[g, i0:i1], dk_part)                             # (Bk, D)
            add_into(dk_acc, dk_part)
        store_scaled(dk, g, j0, dk_acc, scale)
        store_scaled(dv, g, j0, dv_acc, q.dtype.type(1))


@kernel
def _backward_q_kernel(q, k, v, dout, lse, delta, keep, o, wL, wR, scale, block_q, block_k, dq):
    G, Nq, D = q.shape
    Nk = k.shape[1]
    n_blocks = (Nq + block_q - 1) // block_q
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = _paired(task, n_blocks) * block_q
        i1 = min(Nq, i0 + block_q)
        bq = i1 - i0
        qs = np.empty((bq, D), dtype=q.dtype)                              # (Bq, D)
        scale_rows(q, g, i0, scale, qs)                                    # q_I scale
        do = dout[g, i0:i1]                                                # (Bq, Dv)
        dq_acc = np.empty((bq, D), dtype=q.dtype)                          # (Bq, D)
        set_zero(dq_acc)
        dq_part = np.empty((bq, D), dtype=q.dtype)
        p_buf = np.empty(bq * block_k, dtype=q.dtype)
        ds_buf = np.empty(bq * block_k, dtype=q.dtype)
        bits = np.empty(block_k, dtype=np.int32)
        lo, hi = _key_range(i0, i1, o, wL, wR, Nk)
        for j0 in range(lo, hi, block_k):
            j1 = min(hi, j0 + block_k)
            p = _tile(p_buf, bq, j1 - j0)                                  # (Bq, Bk)
            ds = _tile(ds_buf, bq, j1 - j0)                                # (Bq, Bk)
            np.dot(qs, k[g, j0:j1].T, p)                                   # (Bq, Bk) scores
            _probabilities(p, lse, keep, g, i0, j0, o, wL, wR, bits)       # (Bq, Bk) P
            np.dot(do, v[g, j0:j1].T, ds)                                  # (Bq, Bk) dP
            _score_gradient(p, ds, delta, g, i0)                           # (Bq, Bk) dS
            np.dot(ds, k[g, j0:j1], dq_part)                               # (Bq, D)
            add_into(dq_acc, dq_part)
        store_scaled(dq, g, i0, dq_acc, scale)


@kernel
def _backward_slice_kernel(q, k, v, dout, lse, delta, keep, o, wL, wR, scale, block_q, block_k, dq, dk, dv):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    for g in prange(G):
        set_zero(dq[g])
        dk_part = np.empty((block_k, D), dtype=q.dtype)
        dv_part = np.empty((block_k, Dv), dtype=q.dtype)
        dq_part = np.empty((block_q, D), dtype=q.dtype)
        p_buf = np.empty(block_q * block_k, dtype=q.dtype)
        ds_buf = np.empty(block_q * block_k, dtype=q.dtype)
        bits = np.empty(block_k, dtype=np.int32)
        # Invariant: after key block J, dk_J and dv_J are complete and dq holds the sum over blocks <= J.
        for j0 in range(0, Nk, block_k):
            j1 = min(Nk, j0 + block_k)
            bk = j1 - j0
            ks = np.empty((bk, D), dtype=q.dtype)                          # (Bk, D)
            scale_rows(k, g, j0, scale, ks)                                # k_J scale
            dk_acc = np.empty((bk, D), dtype=q.dtype)                      # (Bk, D)
            dv_acc = np.empty((bk, Dv), dtype=q.dtype)                     # (Bk, Dv)
            set_zero(dk_acc)
            set_zero(dv_acc)
            first, stop = _query_range(j0, j1, o, wL, wR, Nq)
            for i0 in range(first, stop, block_q):
                i1 = min(stop, i0 + block_q)
                bq = i1 - i0
                p = _tile(p_buf, bq, bk)                                   # (Bq, Bk)
                ds = _tile(ds_buf, bq, bk)                                 # (Bq, Bk)
                do = dout[g, i0:i1]                                        # (Bq, Dv)
                np.dot(q[g, i0:i1], ks.T, p)                               # (Bq, Bk) scores
                _probabilities(p, lse, keep, g, i0, j0, o, wL, wR, bits)   # (Bq, Bk) P
                np.dot(p.T, do, dv_part[:bk])                              # (Bk, Dv)
                add_into(dv_acc, dv_part[:bk])
                np.dot(do, v[g, j0:j1].T, ds)                              # (Bq, Bk) dP
                _score_gradient(p, ds, delta, g, i0)                       # (Bq, Bk) dS
                np.dot(ds.T, q[g, i0:i1], dk_part[:bk])                    # (Bk, D)
                add_into(dk_acc, dk_part[:bk])
                np.dot(ds, k[g, j0:j1], dq_part[:bq])                      # (Bq, D)
                add_into(dq[g, i0:i1], dq_part[:bq])
            store_scaled(dk, g, j0, dk_acc, scale)
            store_scaled(dv, g, j0, dv_acc, q.dtype.type(1))
        store_scaled(dq, g, 0, dq[g], scale)


def full_band(offset, Nq: int, Nk: int) -> tuple[int, int, int]:
    """``(o, wL, wR)`` of the band that holds every visible key: exact attention as a band."""
    if offset is None:
        return 0, max(0, Nq - 1), max(0, Nk - 1)
    return int(offset), max(0, Nq - 1 + int(offset)), 0


def banded_forward(q, k, v, mask, band, scale, block_q, block_k):
    """Online-softmax forward over the band ``(o, wL, wR)``; returns ``(out, lse)``."""
    q, k, v = contiguous(q, k, v)
    G, Nq, _ = q.shape
    out = np.empty((G, Nq, v.shape[2]), dtype=q.dtype)
    lse = np.empty((G, Nq), dtype=q.dtype)
    with blas_single_thread():
        _forward_kernel(q, k, v, as_kernel_mask(mask), *band, q.dtype.type(scale), block_q, block_k, out, lse)
    return out, lse


def banded_backward(dout, q, k, v, out, lse, mask, band, scale, block_q, block_k):
    """Two-pass backward over the band ``(o, wL, wR)`` from the saved logsumexp."""
    q, k, v, dout = contiguous(q, k, v, dout)
    delta = np.einsum("gid,gid->gi", dout, out)                              # (G, Nq)
    args = (q, k, v, dout, lse, delta, as_kernel_mask(mask), *band, q.dtype.type(scale), block_q, block_k)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    with blas_single_thread():
        if _slices_fill_the_threads(q.shape[0]):                           # one pass, five products per tile
            _backward_slice_kernel(*args, dq, dk, dv)
        else:                                                              # two passes, seven products per tile
            _backward_kv_kernel(*args, dk, dv)
            _backward_q_kernel(*args, dq)
    return dq, dk, dv


def _slices_fill_the_threads(G: int) -> bool:
    """Whether one task per slice keeps every Numba thread busy: G a multiple of, or at least twice, the threads."""
    threads = numba.get_num_threads()
    return G % threads == 0 or G >= 2 * threads


def _exact_blocks(q, v, block_q, block_k):
    """Exact attention's tile sizes: query blocks up to ``EXACT_BLOCK_Q_CPU`` rows."""
    return cpu_blocks(q.shape[2], v.shape[2], block_q, block_k, max_block_q=EXACT_BLOCK_Q_CPU,
                      tile_macs=EXACT_TILE_MACS)


def blocked_forward(q, k, v, *, mask, offset, scale, algorithm="blocked", block_q=None, block_k=None):
    """Blocked online-softmax forward over every visible key (exact attention); see the module docstring.

    The signature is exact attention's backend entry point: ``algorithm`` is "blocked"
    whenever this runs (the registry refuses "naive" outside NumPy)."""
    block_q, block_k = _exact_blocks(q, v, block_q, block_k)
    band = full_band(offset, q.shape[1], k.shape[1])
    out, lse = banded_forward(q, k, v, mask, band, scale, block_q, block_k)
    return out, {"lse": lse, "algorithm": "blocked", "block_q": block_q, "block_k": block_k}


def blocked_backward(dout, q, k, v, out, res, *, mask, offset, scale, block_q=None, block_k=None, **params):
    """Blocked backward over every visible key from the saved logsumexp ``res["lse"]``."""
    block_q, block_k = _exact_blocks(q, v, block_q, block_k)
    band = full_band(offset, q.shape[1], k.shape[1])
    return banded_backward(dout, q, k, v, out, res["lse"], mask, band, scale, block_q, block_k)
