"""``topk_oracle`` on the CPU: per-row selection without an Nq x Nk array.

Matches :func:`eff_attn.methods.topk_oracle.reference.topk_oracle_reference`.
``prange`` over (slice, query block); a task holds one (Bq, Nk) score block,
and for each row selects the ``k`` best visible scores with a max-heap of
the ``k`` best so far (O(Nk log k), one comparison for most keys; ties keep
the lower index), orders them by a heap sort of the ``k`` kept items, and
runs an exact max-shifted softmax over them. Written as plain loops (no
array expressions, no ``np.partition``): these compile in a fraction of the
time. The row's full logsumexp gives ``mass_kept``.
Forward only: the oracle's backward is NumPy's.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..._jit import blas_single_thread, contiguous, exp_shifted, kernel, serial
from ...masks import as_kernel_mask

__all__ = ["forward"]

#: Queries per block: the (Bq, Nk) score block is the working set.
QUERY_BLOCK = 64


@serial
def _before(a, ia, b, ib):
    """Whether ``(a, ia)`` sorts before ``(b, ib)``: by value (NaN last, as ``np.sort``), then by index."""
    if a != a:
        return b != b and ia < ib
    if b != b:
        return True
    return a < b or (a == b and ia < ib)


@serial
def _sift_down(vals, idx, root, size):
    """Restore the max-heap order (under :func:`_before`) of ``vals[:size]``, ``idx[:size]`` below ``root``."""
    while True:
        child = 2 * root + 1
        if child >= size:
            return
        if child + 1 < size and _before(vals[child], idx[child], vals[child + 1], idx[child + 1]):
            child += 1                                                     # the later of the two children
        if not _before(vals[root], idx[root], vals[child], idx[child]):
            return
        vals[root], vals[child] = vals[child], vals[root]
        idx[root], idx[child] = idx[child], idx[root]
        root = child


@serial
def _top_indices(neg, vals, order):
    """``order`` (kk,) <- the indices of the ``kk`` smallest entries of ``neg``, ordered by (value, index).

    The order of a stable sort of ``neg`` with NaN last. A max-heap of the
    ``kk`` best so far (O(Nk log kk); the root is the worst kept, so most keys
    cost one comparison), then a heap sort of the kept entries. ``vals``
    (kk,) is scratch.
    """
    kk = order.shape[0]
    for j in range(kk):
        vals[j] = neg[j]
        order[j] = j
    for root in range(kk // 2 - 1, -1, -1):
        _sift_down(vals, order, root, kk)
    for j in range(kk, neg.shape[0]):
        if _before(neg[j], j, vals[0], order[0]):                          # better than the worst kept: replace it
            vals[0] = neg[j]
            order[0] = j
            _sift_down(vals, order, 0, kk)
    for end in range(kk - 1, 0, -1):                                       # heap sort: best first
        vals[0], vals[end] = vals[end], vals[0]
        order[0], order[end] = order[end], order[0]
        _sift_down(vals, order, 0, end)


@kernel
def _topk_kernel(q, k, v, keep, causal, offset, scale, topk, block_q, out, support, mass_kept):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    kk = min(topk, Nk)
    has_mask = keep.shape[0] > 0
    n_blocks = (Nq + block_q - 1) // block_q
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = (task % n_blocks) * block_q
        i1 = min(Nq, i0 + block_q)
        qs = np.empty((i1 - i0, D), dtype=q.dtype)                         # (Bq, D) scaled queries
        for r in range(i1 - i0):
            for c in range(D):
                qs[r, c] = q[g, i0 + r, c] * scale
        s = np.dot(qs, k[g].T)                                             # (Bq, Nk)
        bits = np.empty(Nk, dtype=np.int32)                                # exp_shifted's (unused) scratch
        neg = np.empty(Nk)                                                 # (Nk,) -S, +inf if invisible
        vals = np.empty(kk)                                                # (kk,) selection scratch
        order = np.empty(kk, dtype=np.int64)                               # (kk,) best first
        acc = np.empty(Dv)                                                 # (Dv,)
        for r in range(i1 - i0):
            i = i0 + r
            row = s[r]
            end = Nk if not causal else min(Nk, max(0, i + offset + 1))
            for j in range(Nk):
                neg[j] = np.inf
            for j in range(end):
                if not has_mask or keep[g, j]:
                    neg[j] = -row[j]
            _top_indices(neg, vals, order)
            mu = -neg[order[0]]
            for c in range(Dv):
                out[g, i, c] = 0
            for t in range(kk):
                support[g, i, t] = -1
            mass_kept[g, i] = 0
            if mu == -np.inf:                                              # nothing visible
                continue
            for j in range(Nk):                                            # invisible keys weigh nothing
                if neg[j] == np.inf:
                    row[j] = -np.inf
            total = exp_shifted(row, row.dtype.type(mu), bits)             # row <- exp(S - mu); all visible keys
            kept = 0.0
            for c in range(Dv):
                acc[c] = 0.0
            for t in range(kk):
                j = order[t]
                if neg[j] == np.inf:
                    break
                w = row[j]                                                 # exp(S_ij - mu)
                kept += w
                for c in range(Dv):
                    acc[c] += w * v[g, j, c]
                support[g, i, t] = j
            for c in range(Dv):
                out[g, i, c] = acc[c] / kept
            mass_kept[g, i] = kept / total


def forward(q, k, v, *, mask, offset, scale, topk):
    q, k, v = contiguous(q, k, v)
    G, Nq, _ = q.shape
    keep = as_kernel_mask(mask)
    out = np.empty((G, Nq, v.shape[2]), dtype=q.dtype)
    support = np.empty((G, Nq, min(topk, k.shape[1])), dtype=np.int64)
    mass_kept = np.empty((G, Nq), dtype=q.dtype)
    with blas_single_thread():
        _topk_kernel(q, k, v, keep, offset is not None, 0 if offset is None else offset, q.dtype.type(scale),
                     topk, QUERY_BLOCK, out, support, mass_kept)
    return out, {"support": support, "mass_kept": mass_kept, "count": (support >= 0).sum(axis=-1)}
