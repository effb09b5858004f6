"""``topk_oracle`` on the CPU: per-row selection without an Nq x Nk array.

Matches :func:`eff_attn.methods.topk_oracle.reference.topk_oracle_reference`.
``prange`` over (slice, query block); a task holds one (Bq, Nk) score block,
and for each row selects the ``k`` best visible scores in O(Nk) (a partition
for the k-th best, then one scan; ties keep the lower index), orders them by
a stable sort of ``k`` items, and runs an exact max-shifted softmax over
them. The row's full logsumexp gives ``mass_kept``.
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
def _top_indices(neg, topk):
    """Indices of the ``topk`` smallest entries of ``neg``, ordered by (value, index)."""
    Nk = neg.shape[0]
    if topk >= Nk:
        return np.argsort(neg, kind="mergesort")
    threshold = np.partition(neg, topk - 1)[topk - 1]                      # the k-th smallest value
    chosen = np.empty(topk, dtype=np.int64)
    c = 0
    for j in range(Nk):                                                    # strictly better: all of them
        if neg[j] < threshold:
            chosen[c] = j
            c += 1
    for j in range(Nk):                                                    # ties: lowest indices first
        if c == topk:
            break
        if neg[j] == threshold:
            chosen[c] = j
            c += 1
    return chosen[np.argsort(neg[chosen], kind="mergesort")]             # stable: ties stay in index order


@kernel
def _topk_kernel(q, k, v, keep, causal, offset, scale, topk, block_q, out, support, mass_kept):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    has_mask = keep.shape[0] > 0
    n_blocks = (Nq + block_q - 1) // block_q
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = (task % n_blocks) * block_q
        i1 = min(Nq, i0 + block_q)
        s = np.dot(q[g, i0:i1] * scale, k[g].T)                            # (Bq, Nk)
        bits = np.empty(Nk, dtype=np.int32)                                # exp_shifted's (unused) scratch
        for r in range(i1 - i0):
            i = i0 + r
            row = s[r]
            end = Nk if not causal else min(Nk, max(0, i + offset + 1))
            neg = np.full(Nk, np.inf)                                      # (Nk,) -S, +inf if invisible
            for j in range(end):
                if not has_mask or keep[g, j]:
                    neg[j] = -row[j]
            order = _top_indices(neg, topk)                                # (min(k, Nk),) best first
            mu = -neg[order[0]]
            out[g, i] = 0
            support[g, i] = -1
            mass_kept[g, i] = 0
            if mu == -np.inf:                                              # nothing visible
                continue
            for j in range(Nk):                                            # invisible keys weigh nothing
                if neg[j] == np.inf:
                    row[j] = -np.inf
            total = exp_shifted(row, row.dtype.type(mu), bits)             # row <- exp(S - mu); all visible keys
            kept = 0.0
            acc = np.zeros(Dv)
            for t in range(order.shape[0]):
                j = order[t]
                if neg[j] == np.inf:
                    break
                w = row[j]                                                 # exp(S_ij - mu)
                kept += w
                acc += w * v[g, j]
                support[g, i, t] = j
            out[g, i] = acc / kept
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
