"""``uniform`` on the CPU: one running sum per (slice, value column).

Matches :func:`eff_attn.methods.uniform.reference.uniform_reference`.
``prange`` over slices; each task walks the keys once, keeping the running
sum and count of kept values, and emits a query's mean as soon as its
visible range ends. The backward walks the queries backwards with a running
suffix sum. Time ``O((Nq + Nk) Dv)`` per slice, no temporaries beyond one row.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..._jit import contiguous, kernel
from ...masks import as_kernel_mask

__all__ = ["forward", "backward"]


@kernel
def _forward_kernel(v, keep, causal, offset, Nq, out):
    G, Nk, Dv = v.shape
    has_mask = keep.shape[0] > 0
    for g in prange(G):
        # Explicit loops, not array expressions: the same work at a fraction of the compile time.
        running = np.empty(Dv, dtype=v.dtype)
        for c in range(Dv):
            running[c] = 0
        count = 0
        j = 0  # keys [0, j) are summed
        for i in range(Nq):
            end = Nk if not causal else min(Nk, max(0, i + offset + 1))
            while j < end:
                if not has_mask or keep[g, j]:
                    for c in range(Dv):
                        running[c] += v[g, j, c]
                    count += 1
                j += 1
            for c in range(Dv):
                out[g, i, c] = running[c] / count if count > 0 else 0


@kernel
def _backward_kernel(dout, keep, causal, offset, Nk, dv):
    G, Nq, Dv = dout.shape
    has_mask = keep.shape[0] > 0
    for g in prange(G):
        # counts |V_i| by a forward pass over the keys
        counts = np.empty(Nq, dtype=np.int64)
        count = 0
        j = 0
        for i in range(Nq):
            end = Nk if not causal else min(Nk, max(0, i + offset + 1))
            while j < end:
                if not has_mask or keep[g, j]:
                    count += 1
                j += 1
            counts[i] = count
        # dv_j = sum over queries whose range reaches past j, walking backwards
        running = np.empty(Dv, dtype=dout.dtype)
        for c in range(Dv):
            running[c] = 0
        i = Nq - 1
        for j in range(Nk - 1, -1, -1):
            while i >= 0 and (not causal or i + offset + 1 > j):
                if counts[i] > 0:
                    for c in range(Dv):
                        running[c] += dout[g, i, c] / counts[i]
                i -= 1
            visible = not has_mask or keep[g, j]
            for c in range(Dv):
                dv[g, j, c] = running[c] if visible else 0


def forward(q, k, v, *, mask, offset, scale):
    (v,) = contiguous(v)
    out = np.empty((v.shape[0], q.shape[1], v.shape[2]), dtype=v.dtype)
    _forward_kernel(v, as_kernel_mask(mask), offset is not None, 0 if offset is None else offset, q.shape[1], out)
    return out, {}


def backward(dout, q, k, v, out, res, *, mask, offset, scale):
    (dout,) = contiguous(dout)
    dv = np.empty_like(v)
    _backward_kernel(dout, as_kernel_mask(mask), offset is not None, 0 if offset is None else offset, k.shape[1], dv)
    return np.zeros_like(q), np.zeros_like(k), dv
