"""Key-padding masks, causal alignment and the visible set.

Query ``i`` sits at position ``p_i = i + o``. Key ``j`` is *visible* to query
``i`` when ``mask[j]`` is True and, for causal attention, ``j <= p_i``:

- ``causal=True`` (or ``"bottom_right"``): ``o = Nk - Nq``, the queries are the
  last ``Nq`` positions, as in KV-cache decoding and flash-attn;
- ``causal="top_left"``: ``o = 0``, as in ``torch.nn.functional.scaled_dot_product_attention``.

The two agree when ``Nq == Nk``. Every method takes the offset ``o`` from
:func:`causal_offset`; ``None`` means non-causal.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "as_kernel_mask",
    "as_cuda_mask",
    "causal_offset",
    "causal_argument",
    "query_positions",
    "visible_pairs",
    "visible_counts",
    "empty_rows",
    "causal_pair_count",
    "masked_scores",
]

_CAUSAL_CHOICES = (False, True, None, "bottom_right", "top_left")


def causal_offset(causal, Nq: int, Nk: int) -> int | None:
    """Offset ``o`` such that query ``i`` sits at position ``i + o``.

    Parameters
    ----------
    causal : bool, None, "bottom_right" or "top_left"
    Nq, Nk : int

    Returns
    -------
    int or None
        ``Nk - Nq`` for bottom-right, ``0`` for top-left, ``None`` when not causal.
    """
    if isinstance(causal, (bool, np.bool_)) or causal is None:
        return (Nk - Nq) if causal else None
    if causal == "bottom_right":
        return Nk - Nq
    if causal == "top_left":
        return 0
    raise ValueError(
        f"causal={causal!r} is not valid; use False, True (= 'bottom_right') or 'top_left'"
    )


def causal_argument(offset: int | None, Nq: int, Nk: int):
    """The ``causal=`` value that gives ``offset``: False, True or "top_left"."""
    if offset is None:
        return False
    return True if offset == Nk - Nq else "top_left"


def query_positions(Nq: int, offset: int, xp=np):
    """Positions ``p_i = i + o`` of the queries, shape (Nq,)."""
    return xp.arange(Nq) + offset


def visible_pairs(mask, offset, Nq: int, Nk: int, xp=np):
    """Boolean visibility of every (query, key) pair.

    Parameters
    ----------
    mask : bool array of shape (..., Nk) or None
    offset : int or None
        Causal offset from :func:`causal_offset`.

    Returns
    -------
    bool array of shape (..., Nq, Nk), or (Nq, Nk) when ``mask`` is None.
    """
    visible = xp.ones((Nq, Nk), dtype=bool)                                   # (Nq, Nk)
    if offset is not None:
        p = query_positions(Nq, offset, xp)                                   # (Nq,)
        visible = xp.arange(Nk)[None, :] <= p[:, None]                        # (Nq, Nk)
    if mask is not None:
        visible = visible & mask[..., None, :]                                # (..., Nq, Nk)
    return visible


def visible_counts(mask, offset, Nq: int, Nk: int, xp=np):
    """Number of visible keys of each query, shape (..., Nq), int64.

    Computed in O(Nq + Nk) without forming the (Nq, Nk) visibility matrix.
    Shape (Nq,) when ``mask`` is None.
    """
    if offset is None:
        last = xp.full(Nq, Nk - 1, dtype=np.int64)                            # (Nq,) last visible key
    else:
        last = xp.clip(query_positions(Nq, offset, xp), -1, Nk - 1)          # (Nq,)
    if mask is None:
        return (last + 1).astype(np.int64)                                    # (Nq,)
    kept_prefix = xp.cumsum(mask, axis=-1, dtype=np.int64)                    # (..., Nk)
    zero = xp.zeros((*kept_prefix.shape[:-1], 1), dtype=np.int64)            # (..., 1)
    kept_prefix = xp.concatenate([zero, kept_prefix], axis=-1)                # (..., Nk + 1)
    return xp.take(kept_prefix, last + 1, axis=-1)                            # (..., Nq)


def empty_rows(mask, offset, Nq: int, Nk: int, xp=np):
    """Rows that see no key at all, shape (..., Nq), bool. Their output is 0."""
    return visible_counts(mask, offset, Nq, Nk, xp) == 0


def causal_pair_count(Nq: int, Nk: int, offset: int | None) -> int:
    """Visible pairs without a mask: ``Nq*Nk``, or ``sum_i min(Nk, max(0, p_i + 1))``."""
    if offset is None:
        return Nq * Nk
    p = np.arange(Nq, dtype=np.int64) + offset
    return int(np.minimum(Nk, np.maximum(0, p + 1)).sum())


def masked_scores(scores, visible, xp=np):
    """Scores with invisible pairs set to ``-inf`` (a ``where``, never a product)."""
    return xp.where(visible, scores, -xp.inf)


def as_kernel_mask(mask):
    """A boolean mask as the Numba kernels take it: C-contiguous, or an empty (0, 0) array for None."""
    return np.empty((0, 0), dtype=np.bool_) if mask is None else np.ascontiguousarray(mask)


def as_cuda_mask(xp, mask):
    """``(keep, has_mask)`` as the CUDA kernels take them: a (1, 1) placeholder and False for no mask."""
    return (xp.ones((1, 1), dtype=bool), False) if mask is None else (mask, True)
