"""Shared integer machinery of the hashing and routing methods.

- :func:`sign_bit_codes` packs sign-random-projection bits into integer codes,
  bit ``t`` worth ``2**t`` (``yoso`` and ``kdeformer``).
- :func:`stable_key_argsort` sorts by an integer key with ties broken by
  position, through the unique int64 key ``key * N + index``; any sort, even
  an unstable GPU one, then returns the stable permutation (``reformer``,
  ``kdeformer``, ``routing``, ``treeformer``).
- :func:`segment_offsets` gives CSR offsets of sorted keys.

All functions take the array module ``xp`` (NumPy or CuPy) from their inputs'
caller, so every backend runs the same integer steps.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sign_bit_codes", "stable_key_argsort", "inverse_permutation", "segment_offsets"]

#: Largest number of sign bits packed into one int32 code.
MAX_CODE_BITS = 30


def sign_bit_codes(x, hyperplanes, xp=np, *, dtype=np.float64):
    """Codes ``c_h(x) = sum_t 2**t [r_{h,t} . x > 0]``.

    The comparison is strict, so a zero projection gives bit 0. Projections
    are computed in ``dtype`` (float64 by default, so that every backend
    packs the same bits).

    Parameters
    ----------
    x : array of shape (..., N, D)
    hyperplanes : array of shape (..., m, tau, D)
        Broadcast over the leading axes of ``x``.

    Returns
    -------
    int32 array of shape (..., N, m)
    """
    m, tau, D = hyperplanes.shape[-3:]
    if tau > MAX_CODE_BITS:
        raise ValueError(f"at most {MAX_CODE_BITS} sign bits fit an int32 code, got tau={tau}")
    planes = hyperplanes.astype(dtype, copy=False).reshape(*hyperplanes.shape[:-3], m * tau, D)
    proj = xp.matmul(x.astype(dtype, copy=False), xp.swapaxes(planes, -1, -2))   # (..., N, m*tau)
    bits = (proj > 0).reshape(*proj.shape[:-1], m, tau)                           # (..., N, m, tau)
    weights = (1 << xp.arange(tau, dtype=np.int64)).astype(np.int32)              # (tau,)
    return (bits * weights).sum(axis=-1, dtype=np.int32)                          # (..., N, m)


def stable_key_argsort(keys, xp=np):
    """Permutation sorting ``keys`` along the last axis, ties by position.

    Sorts the unique int64 key ``keys * N + index``, so the result is the
    stable permutation whatever sort algorithm ``xp`` uses.

    Parameters
    ----------
    keys : non-negative integer array of shape (..., N)

    Returns
    -------
    int64 array of shape (..., N)
    """
    N = keys.shape[-1]
    unique = keys.astype(np.int64) * N + xp.arange(N, dtype=np.int64)             # (..., N)
    return xp.argsort(unique, axis=-1)                                             # (..., N)


def inverse_permutation(perm, xp=np):
    """``inv`` with ``inv[..., perm[..., i]] = i``, along the last axis."""
    inv = xp.empty_like(perm)
    index = xp.broadcast_to(xp.arange(perm.shape[-1], dtype=perm.dtype), perm.shape)
    xp.put_along_axis(inv, perm, index, axis=-1)
    return inv


def segment_offsets(sorted_keys, num_segments: int, xp=np):
    """CSR offsets of sorted integer keys in ``[0, num_segments)``.

    Parameters
    ----------
    sorted_keys : int array of shape (G, N), sorted along the last axis

    Returns
    -------
    int64 array of shape (G, num_segments + 1)
        Segment ``b`` of slice ``g`` is ``sorted_keys[g, off[g, b]:off[g, b + 1]]``.
    """
    G = sorted_keys.shape[0]
    flat = (sorted_keys.astype(np.int64) + num_segments * xp.arange(G, dtype=np.int64)[:, None]).ravel()
    counts = xp.bincount(flat, minlength=G * num_segments).reshape(G, num_segments)  # (G, B)
    offsets = xp.zeros((G, num_segments + 1), dtype=np.int64)                       # (G, B + 1)
    offsets[:, 1:] = xp.cumsum(counts, axis=-1)
    return offsets
