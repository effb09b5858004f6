"""Independent float64 oracles for the tests, written without the package's code."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


def visible_matrix(Nq, Nk, mask=None, causal=False):
    """(..., Nq, Nk) visibility from first principles: bottom-right or top-left causal."""
    vis = np.ones((Nq, Nk), dtype=bool)
    if causal:
        offset = Nk - Nq if causal in (True, "bottom_right") else 0
        vis = np.array([[j <= i + offset for j in range(Nk)] for i in range(Nq)], dtype=bool)
    if mask is not None:
        vis = vis & np.asarray(mask)[..., None, :]
    return vis


def dense_attention(q, k, v, visible, scale=None):
    """Softmax attention by scipy's logsumexp, row by row semantics, float64.

    Returns ``(out, lse)``; empty rows give 0 and ``-inf``.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * np.einsum("...id,...jd->...ij", q, k)
    s = np.where(visible, s, -np.inf)
    with np.errstate(divide="ignore"):
        lse = logsumexp(s, axis=-1)
    empty = ~np.broadcast_to(visible, s.shape).any(-1)
    w = np.where(empty[..., None], 0.0, np.exp(s - np.where(empty, 0.0, lse)[..., None]))
    out = np.einsum("...ij,...jd->...id", w, v)
    return out, np.where(empty, -np.inf, lse)
