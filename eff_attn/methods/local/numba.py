"""Local attention on the CPU: exact attention's banded online-softmax kernels, O(Nq w).

Matches :func:`eff_attn.methods.local.reference.local_reference`. The
kernels are exact attention's (:func:`eff_attn._softmax_numba.banded_forward`
and ``banded_backward``), which attend over a band of positions; exact
attention runs them with the band that holds every key, this module with
the window ``(wL, wR)``. No array larger than one (Bq, Bk) tile per task
is allocated.

Blocking
    ``prange`` over ``G x ceil(Nq / Bq)`` tasks; a task owns one query block
    ``[i0, i1)`` of one slice. Its queries' bands together cover the clipped
    key range ``[p_i0 - wL, p_(i1-1) + wR]``, walked in tiles of ``Bk`` keys
    with the online softmax (running max ``mu``, sum ``l``, accumulator
    ``acc``). A tile wholly inside every row's band (the bulk of the range
    when ``w >> Bq``) needs no mask; only the edge tiles, and tiles under a
    key mask, get one.

Backward
    Two passes without atomics: one task per key block walks the query
    blocks whose bands reach it (``dk``, ``dv``); one task per query block
    walks its key range (``dq``). Both recompute ``P = exp(S - L)`` on the
    band from the saved logsumexp ``L``.
"""

from __future__ import annotations

import numpy as np

from ..._softmax_numba import banded_backward, banded_forward
from ..._tile_sizes import cpu_blocks
from ._common import band, band_result

__all__ = ["forward", "backward"]


def _prepare(q, k, v, mask, offset, window, block_q, block_k):
    """Masked keys zeroed, the clipped band and the tile sizes."""
    if mask is not None:                                                   # masked keys never enter the arithmetic
        k = np.where(mask[..., None], k, 0)
        v = np.where(mask[..., None], v, 0)
    o, wL, wR = band(offset, q.shape[1], k.shape[1], window)
    tile_q, block_k = cpu_blocks(q.shape[2], v.shape[2], None, block_k)
    if block_q is None:                                                    # a row computes Bq + wL + wR scores, so
        block_q = min(tile_q, max(16, 1 << max(wL + wR - 1, 0).bit_length()))  # Bq: a power of two ~ the band
    return k, v, (o, wL, wR), block_q, block_k


def computed_pairs(G: int, Nq: int, Nk: int, o: int, wL: int, wR: int, block_q: int) -> int:
    """Scores the kernel evaluates: each query block times the key range its bands reach."""
    i0 = np.arange(0, Nq, block_q)                                         # (n_blocks,)
    i1 = np.minimum(Nq, i0 + block_q)
    lo = np.maximum(0, i0 + o - wL)
    hi = np.minimum(Nk, i1 - 1 + o + wR + 1)
    return int(G * ((i1 - i0) * np.maximum(0, hi - lo)).sum())


def forward(q, k, v, *, mask, offset, scale, window, block_q=None, block_k=None):
    """Banded online-softmax forward; see the module docstring."""
    k, v, (o, wL, wR), block_q, block_k = _prepare(q, k, v, mask, offset, window, block_q, block_k)
    G, Nq, _ = q.shape
    Nk = k.shape[1]
    out, lse = banded_forward(q, k, v, mask, (o, wL, wR), scale, block_q, block_k)
    res = {"lse": lse, "block_q": block_q, "block_k": block_k}
    return out, band_result(res, mask, o, wL, wR, Nq, Nk, np, computed_pairs(G, Nq, Nk, o, wL, wR, block_q))


def backward(dout, q, k, v, out, res, *, mask, offset, scale, window, block_q=None, block_k=None):
    """Two-pass banded backward from the saved logsumexp."""
    k, v, bounds, block_q, block_k = _prepare(q, k, v, mask, offset, window, block_q, block_k)
    return banded_backward(dout, q, k, v, out, res["lse"], mask, bounds, scale, block_q, block_k)
