"""Index arithmetic that Nystrom's reference and kernels share: segments and input scales."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["segment_bounds", "input_scales"]


def segment_bounds(N: int, m: int, xp=np):
    """Floor segment boundaries ``b_t = floor(t N / m)``, ``t = 0..m``, shape (m + 1,).

    Segment ``t`` is ``[b_t, b_{t+1})``; with ``1 <= m <= N`` none is empty.
    """
    return (xp.arange(m + 1, dtype=np.int64) * N) // m


def input_scales(scale: float) -> tuple[float, float]:
    """Factors ``(a_q, a_k)`` with ``a_q a_k = scale``, applied to q and k.

    ``sqrt(s)`` each (``D**-0.25`` at the default scale); a negative scale
    keeps its sign on the queries. The landmarks are linear means, so any
    split gives the same scores; the even split keeps both sides at one size.
    """
    root = math.sqrt(abs(scale))
    return math.copysign(root, scale), root
