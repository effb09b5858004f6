"""The numerics of Performer's stable form that its reference and kernels share (host and device)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["rescale", "feature_ratio", "key_shifts", "scan_factors", "total_factors", "causal_layout"]


def rescale(x, y, xp=np):
    """``exp(x - y)`` for ``x <= y``, and 0 where ``x = -inf`` (never ``exp(-inf + inf)``)."""
    finite = xp.isfinite(x)
    diff = xp.where(finite, x, 0) - xp.where(xp.isfinite(y), y, 0)
    return xp.where(finite, xp.exp(xp.minimum(diff, 0)), 0).astype(x.dtype, copy=False)


def feature_ratio(variant: str, m: int) -> float:
    """The ``m^(-1/2)`` of the textbook features; it cancels in the stable form, which omits it."""
    return 1.0 / math.sqrt(m) if variant == "textbook" else 1.0


def key_shifts(chunk_max, variant: str, eps: float, xp=np):
    """The shift of each key chunk, shape (G, n_c).

    - stable, ``eps = 0``: the chunk's own max of ``lambda`` over kept keys
      (``-inf`` when it keeps none); the scan rescales between chunks;
    - stable, ``eps > 0``: one shift for every key, the max over all kept
      keys, so that ``eps`` has one meaning across chunks;
    - textbook: 0 (no shift at all).
    """
    if variant == "textbook":
        return xp.zeros_like(chunk_max)
    if eps > 0:
        return xp.broadcast_to(chunk_max.max(axis=-1, keepdims=True), chunk_max.shape).copy()
    return chunk_max


def scan_factors(shifts):
    """Factors of the prefix scan over key chunks, from the host array ``shifts`` (G, n_c).

    ``T_c = max(s_0..s_c)`` is the running shift after chunk ``c``;
    ``alpha_c = exp(T_(c-1) - T_c)`` moves the prefix to the new shift and
    ``beta_c = exp(s_c - T_c)`` brings chunk ``c``'s own state to it. Both
    are at most 1. Returns ``(alpha, beta)``, each (G, n_c).
    """
    shifts = np.asarray(shifts)
    T = np.maximum.accumulate(shifts, axis=-1)                                # (G, n_c)
    T_prev = np.concatenate([np.full_like(T[:, :1], -np.inf), T[:, :-1]], axis=-1)  # (G, n_c)
    return rescale(T_prev, T), rescale(shifts, T)


def total_factors(shifts):
    """Non-causal: ``beta_c = exp(s_c - max_c s_c)``, bringing every chunk to the global shift (G, n_c)."""
    shifts = np.asarray(shifts)
    return rescale(shifts, shifts.max(axis=-1, keepdims=True))


def causal_layout(Nq: int, Nk: int, offset: int, chunk: int) -> tuple[int, int, int, int]:
    """Positions cut into chunks of ``chunk``: ``(n_c, i_first, p_first, n_valid)``.

    Query ``i`` sits at position ``p_i = i + offset``; key ``j`` at ``j``.
    The grid covers ``[0, n_c * chunk)`` with ``n_c * chunk >= max(Nk, p_last + 1)``,
    so every query with ``p_i >= 0`` has its own slot (keys past ``Nk`` are
    padding). Queries ``i < i_first`` sit before key 0 and see nothing;
    the others fill slots ``[p_first, p_first + n_valid)``.
    """
    p_last = Nq - 1 + offset
    n_c = max(1, -(-max(Nk, p_last + 1) // chunk))
    i_first = min(Nq, max(0, -offset))
    return n_c, i_first, i_first + offset, Nq - i_first
