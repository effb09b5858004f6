"""Per-head learned state: which state head serves each flattened (batch, head) slice.

Routing's centroids, Treeformer's trees and Sparsefinder's projections are
fitted per head, with a head shape that broadcasts right-aligned against the
inputs' leading axes (``()`` for one state shared by every slice, ``(heads,)``
for one per head).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["check_head_shape", "head_index"]


def check_head_shape(head_shape, batch_shape, *, what="the state's head shape", hint="") -> None:
    """Raise ValueError, naming ``what``, unless ``head_shape`` broadcasts right-aligned to ``batch_shape``."""
    head_shape, batch_shape = tuple(head_shape), tuple(batch_shape)
    try:
        ok = np.broadcast_shapes(head_shape, batch_shape) == batch_shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{what} {head_shape} does not broadcast to the inputs' leading axes {batch_shape}"
                         + (f"; {hint}" if hint else ""))


def head_index(head_shape, batch_shape, *, what="the state's head shape", hint="") -> np.ndarray:
    """Index of the state head that serves each flattened slice, shape (G,).

    The heads are numbered in C order; ``arange(prod head_shape)`` is broadcast
    right-aligned to ``batch_shape`` and flattened.

    Raises
    ------
    ValueError
        If ``head_shape`` does not broadcast to ``batch_shape`` (see :func:`check_head_shape`).
    """
    check_head_shape(head_shape, batch_shape, what=what, hint=hint)
    heads = np.arange(math.prod(head_shape), dtype=np.int64).reshape(tuple(head_shape))
    return np.ascontiguousarray(np.broadcast_to(heads, tuple(batch_shape))).reshape(-1)
