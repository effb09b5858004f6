"""Local attention on the GPU: sliding chunks, cuBLAS and one fused band-softmax kernel.

Matches :func:`eff_attn.methods.local.reference.local_reference`, step for step:

1. pad k and v and view overlapping windows ``(G, n_ch, c + wL + wR, D)``
   (a strided view: nothing is copied per window);
2. ``S = (s q_chunk) k_win^T``, one batched cuBLAS product, (G, n_ch, c, W);
3. ``_band_softmax`` (numba.cuda, one thread block per row): sets every
   slot off the band, masked or outside the keys to ``-inf``, takes the row
   max, exponentiates, sums and normalises ``S`` in place into ``P``, and
   writes the row's logsumexp;
4. ``out = P v_win``, one more batched product.

Memory ``O(G Nq (c + wL + wR))``: the score block is the only large array.
TF32 stays off, so float32 products are IEEE float32.

Backward
    The reference's sliding-chunk backward, run with ``xp = cupy``: batched
    products on the windows and an overlap-add of the window gradients.

The kernel runs on CuPy arrays on a GPU and on NumPy arrays under the CUDA
simulator (``eff_attn.testing.emulate_cupy``).
"""

from __future__ import annotations

import math

from numba import cuda, float64

from ..._cuda import launch_rows, xp_of
from ..._cuda_device import MAX_THREADS, block_reduce, exp_shift, nan_max
from ...masks import as_cuda_mask
from . import reference
from ._common import DEFAULT_CHUNK, band_result

__all__ = ["forward", "backward"]


@cuda.jit(device=True)
def _in_band(keep, has_mask, g, j, slot, row, span, Nk):
    """Key ``j`` (window slot ``slot``) is in row ``row``'s band, exists and is kept."""
    d = slot - row
    if d < 0 or d > span or j < 0 or j >= Nk:
        return False
    return (not has_mask) or keep[g, j]


@cuda.jit
def _band_softmax(s, keep, has_mask, start, span, Nq, Nk, lse):
    """In place ``s <- softmax`` over each row's band of the chunked scores ``s`` (G, n_ch, c, W).

    Block ``b`` owns row ``(g, u, r)``, query ``i = u c + r``; slot ``t`` is key
    ``start + u c + t``. Off-band slots become 0. Rows with an empty band, and
    the padding rows ``i >= Nq``, become 0 with ``lse = -inf``. A NaN score makes
    the row NaN; a ``+inf`` max spreads the row over its ``+inf`` keys
    (:mod:`eff_attn._cuda_device`).
    """
    buf = cuda.shared.array(MAX_THREADS, float64)
    _, n_ch, c, W = s.shape
    g = cuda.blockIdx.x // (n_ch * c)
    u = (cuda.blockIdx.x // c) % n_ch
    r = cuda.blockIdx.x % c
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    j0 = start + u * c
    real_row = u * c + r < Nq
    local = -math.inf
    for t in range(tid, W, nt):
        if real_row and _in_band(keep, has_mask, g, j0 + t, t, r, span, Nk):
            local = nan_max(local, s[g, u, r, t])
        else:
            s[g, u, r, t] = -math.inf
    mu = block_reduce(buf, local, True)
    if mu == -math.inf:
        for t in range(tid, W, nt):
            s[g, u, r, t] = 0
        if tid == 0:
            lse[g, u, r] = -math.inf
        return
    local = 0.0
    for t in range(tid, W, nt):
        p = exp_shift(s[g, u, r, t], mu)
        s[g, u, r, t] = p
        local += p
    total = block_reduce(buf, local, False)
    for t in range(tid, W, nt):
        s[g, u, r, t] /= total
    if tid == 0:
        lse[g, u, r] = mu + math.log(total)


def forward(q, k, v, *, mask, offset, scale, window, block_q=None, block_k=None):
    """Sliding-chunks forward; see the module docstring."""
    xp = xp_of(q)
    G, Nq, _ = q.shape
    Nk = k.shape[1]
    ch = reference.SlidingChunks(q, k, v, mask, offset, window, block_q or DEFAULT_CHUNK, xp)
    keep, has_mask = as_cuda_mask(xp, mask)
    scores = xp.matmul(ch.q * q.dtype.type(scale), xp.swapaxes(ch.k, -1, -2))  # (G, n_ch, c, W)
    lse = xp.empty((G, ch.n_ch, ch.c), dtype=q.dtype)                          # (G, n_ch, c)
    launch_rows(_band_softmax, G * ch.n_ch * ch.c, scores, keep, has_mask, ch.start, ch.wL + ch.wR, Nq, Nk, lse)
    out = ch.rows(xp.matmul(scores, ch.v), Nq)                                 # (G, Nq, Dv)
    res = {"lse": ch.rows(lse[..., None], Nq)[..., 0], "block_q": ch.c}
    return out, band_result(res, mask, ch.o, ch.wL, ch.wR, Nq, Nk, xp, G * ch.n_ch * ch.c * ch.W)


def backward(dout, q, k, v, out, res, *, mask, offset, scale, window, block_q=None, block_k=None):
    """The reference's sliding-chunk backward on the device."""
    return reference.backward(dout, q, k, v, out, res, mask=mask, offset=offset, scale=scale, window=window,
                              block_q=block_q, xp=xp_of(q))
