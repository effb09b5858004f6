"""Reformer (LSH attention) on the GPU: batched window tiles and one numba.cuda kernel.

Matches :func:`eff_attn.methods.reformer.reference.reformer_reference`, whose
array program (written against ``xp``) runs here on CuPy:

1. hash by one float64 cuBLAS product and ``argmax`` per round;
2. sort ``bucket * N + position`` with ``cupy.argsort`` through the shared
   :func:`eff_attn._hashing.stable_key_argsort`;
3. gather the sorted rows into (G-major) tiles ``(R, G, n_c, c, D)``, attach
   the previous chunk with ``roll`` and ``concatenate``;
4. one batched (c, 2c) score product per window;
5. ``_window_logits_kernel`` (numba.cuda, one thread per window row):
   visibility, the shared-QK self score, the ``R`` chunk-id comparisons of
   dedup and the ``-log c_ij`` shift in a single pass, where the reference
   broadcasts ``R`` comparison arrays of the tile's size;
6. max-shifted softmax, the value product, and a gather back to position
   order through the inverse permutation; the rounds are combined by their
   logsumexp.

The backward is the reference's pullback through ``xp``, with the same
kernel, replaying the forward's buckets. Memory ``O(R G N (c + D + Dv))``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..._cuda import launch_rows, threads_per_block, xp_of
from . import reference
from ._common import SELF_SCORE

__all__ = ["forward", "backward"]


@cuda.jit
def _window_logits_kernel(S, qpos, kpos, chunk_q, chunk_k, keep, has_mask, causal, offset, shared, dedup,
                          self_score, visible, share, self_seen):
    """One thread per window row ``(r, g, u, a)``: see :func:`reference.window_logits`."""
    R, G, n_c, c, w = S.shape
    row = cuda.grid(1)
    if row >= R * G * n_c * c:
        return
    a = row % c
    u = (row // c) % n_c
    g = (row // (c * n_c)) % G
    r = row // (c * n_c * G)
    i = qpos[r, g, u, a]
    total = 0.0
    seen = False
    for b in range(w):
        j = kpos[r, g, u, b]
        vis = i >= 0 and j >= 0
        if vis and has_mask:
            vis = keep[g, j]
        if vis and causal:
            vis = j <= i + offset
        visible[r, g, u, a, b] = vis
        if not vis:
            continue
        count = 0
        for rr in range(chunk_q.shape[0]):                 # c_ij: rounds pairing i with j
            if (chunk_q[rr, g, i] - chunk_k[rr, g, j] + n_c) % n_c <= 1:
                count += 1
        total += 1.0 / count
        if j == i:
            seen = True
            if shared:
                S[r, g, u, a, b] = self_score
        if dedup:
            S[r, g, u, a, b] -= math.log(count)
    share[r, g, u, a] = total
    self_seen[r, g, u, a] = seen


def window_logits(S, qpos, kpos, chunk_q, chunk_k, mask, offset, shared_qk, dedup, xp):
    """Kernel version of :func:`eff_attn.methods.reformer.reference.window_logits` (``S`` in place)."""
    rows = math.prod(S.shape[:-1])
    visible = xp.empty(S.shape, dtype=bool)
    share = xp.empty(S.shape[:-1], dtype=np.float64)
    self_seen = xp.empty(S.shape[:-1], dtype=bool)
    keep = xp.ones((1, 1), dtype=bool) if mask is None else mask
    threads = threads_per_block()
    # one thread per row: launch ceil(rows / threads) blocks of `threads` threads
    launch_rows(_window_logits_kernel, -(-rows // threads), S, qpos, kpos, chunk_q, chunk_k, keep,
                mask is not None, offset is not None, 0 if offset is None else int(offset), shared_qk, dedup,
                S.dtype.type(SELF_SCORE), visible, share, self_seen, threads=threads)
    return S, visible, share, self_seen


def forward(q, k, v, *, mask, offset, scale, num_hashes, num_buckets, chunk_size, shared_qk, dedup,
            rotations=None, buckets=None):
    return reference.forward(q, k, v, mask=mask, offset=offset, scale=scale, num_hashes=num_hashes,
                             num_buckets=num_buckets, chunk_size=chunk_size, shared_qk=shared_qk, dedup=dedup,
                             rotations=rotations, buckets=buckets, xp=xp_of(q), logits=window_logits)


def backward(dout, q, k, v, out, res, *, mask, offset, scale, chunk_size, shared_qk, dedup, **params):
    return reference.backward(dout, q, k, v, out, res, mask=mask, offset=offset, scale=scale, chunk_size=chunk_size,
                              shared_qk=shared_qk, dedup=dedup, xp=xp_of(q), logits=window_logits)
