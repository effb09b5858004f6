"""Array helpers shared by the NumPy references and the CuPy backends."""

from __future__ import annotations

import numpy as np

__all__ = ["swap_last", "to_host"]


def swap_last(x):
    """``x`` with its last two axes swapped: the transpose of each matrix in a batch.

    A method call, so NumPy and CuPy arrays alike (``x.mT`` needs NumPy >= 2).
    """
    return x.swapaxes(-1, -2)


def to_host(a) -> np.ndarray:
    """A NumPy copy of a NumPy, CuPy, torch or JAX array (NumPy arrays pass through ``np.asarray``)."""
    if hasattr(a, "get"):
        return a.get()
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)
