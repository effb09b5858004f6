"""Array helpers shared by the NumPy references and the CuPy backends."""

from __future__ import annotations

__all__ = ["swap_last"]


def swap_last(x):
    """``x`` with its last two axes swapped: the transpose of each matrix in a batch.

    A method call, so NumPy and CuPy arrays alike (``x.mT`` needs NumPy >= 2).
    """
    return x.swapaxes(-1, -2)
