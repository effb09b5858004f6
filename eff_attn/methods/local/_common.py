"""The band arithmetic that local attention's reference and kernels share."""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_CHUNK", "band", "chunk_geometry", "band_key_counts", "band_result"]

#: Queries per chunk of the sliding-chunks schedule (NumPy reference and CuPy).
#: Each chunk computes ``c + wL + wR`` scores per query, so smaller chunks waste
#: less; 64 rows keep the batched GPU products large enough to run at speed.
DEFAULT_CHUNK = 64


def band(offset, Nq: int, Nk: int, window) -> tuple[int, int, int]:
    """The band ``p_i - wL <= j <= p_i + wR`` as ``(o, wL, wR)``, clipped to what can matter.

    ``o`` is the causal offset, or ``Nk - Nq`` when not causal. A side wider
    than the distance to the far end of the keys is clipped to it, so no
    backend ever loops over, or allocates for, keys that do not exist.
    """
    o = Nk - Nq if offset is None else int(offset)
    wL, wR = window
    wL = min(int(wL), max(0, Nq - 1 + o))         # p_max - wL <= 0 already reaches key 0
    wR = min(int(wR), max(0, Nk - 1 - o))         # p_min + wR >= Nk - 1 already reaches the last key
    return o, wL, wR


def chunk_geometry(Nq: int, chunk: int, wL: int, wR: int) -> tuple[int, int, int]:
    """Sliding chunks: ``(c, n_chunks, width)``, with ``width = c + wL + wR`` key slots per chunk."""
    c = min(chunk, Nq)
    return c, -(-Nq // c), c + wL + wR


def band_key_counts(mask, o: int, wL: int, wR: int, Nq: int, Nk: int, xp=np):
    """Number of kept keys in each query's band, shape (G, Nq) or (Nq,) without a mask.

    Prefix sums of the mask, so O(Nq + Nk): ``count_i = C[hi_i] - C[lo_i]``.
    """
    p = xp.arange(Nq) + o                                                   # (Nq,)
    lo = xp.clip(p - wL, 0, Nk)                                             # (Nq,) first key of the band
    hi = xp.maximum(xp.clip(p + wR + 1, 0, Nk), lo)                         # (Nq,) one past the last
    if mask is None:
        return (hi - lo).astype(np.int64)                                   # (Nq,)
    prefix = xp.cumsum(mask, axis=-1, dtype=np.int64)                       # (G, Nk)
    prefix = xp.concatenate([xp.zeros_like(prefix[:, :1]), prefix], axis=-1)  # (G, Nk + 1)
    return prefix[:, hi] - prefix[:, lo]                                    # (G, Nq)


def band_result(res: dict, mask, o, wL, wR, Nq, Nk, xp, computed_pairs: int) -> dict:
    """Complete a backend's residuals with the band diagnostics every backend reports."""
    counts = band_key_counts(mask, o, wL, wR, Nq, Nk, xp)                   # (G, Nq) or (Nq,)
    G = res["lse"].shape[0]
    counts = xp.broadcast_to(counts, (G, Nq))
    res.update(counts=counts, empty_rows=counts == 0, computed_pairs=int(computed_pairs))
    return res
