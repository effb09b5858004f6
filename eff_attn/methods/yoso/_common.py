"""What YOSO's reference and kernels share: the hash codes and the unit rows."""

from __future__ import annotations

import numpy as np

from ..._hashing import sign_bit_codes
from ..._validate import check_choice

__all__ = ["EPS", "EXACT_GRAD_Z_CAP", "HASH_DTYPES", "yoso_codes", "unit_rows"]

HASH_DTYPES = ("float64", "input")
#: The floor of the norms in ``q / max(|q|, EPS)`` and ``u / max(|u|, EPS)``.
EPS = 1e-12
#: ``grad="exact"`` caps ``|z|`` here, where ``d arccos(z) / dz`` is still finite.
EXACT_GRAD_Z_CAP = 1.0 - 1e-6


def yoso_codes(x, hyperplanes, *, hash_dtype="float64") -> np.ndarray:
    """Bucket codes ``c_h(x) = sum_b 2**b [r_{h,b} . x > 0]`` of every row of ``x``.

    Parameters
    ----------
    x : ndarray of shape (..., N, D)
    hyperplanes : ndarray of shape (..., m, tau, D)
        Broadcast over the leading axes of ``x``.
    hash_dtype : {"float64", "input"}, default="float64"
        Precision of the projections; float64 makes the codes agree across
        backends.

    Returns
    -------
    int32 ndarray of shape (..., N, m), values in ``[0, 2**tau)``
    """
    check_choice("hash_dtype", hash_dtype, HASH_DTYPES)
    x = np.asarray(x)
    dtype = np.float64 if hash_dtype == "float64" else x.dtype
    return sign_bit_codes(x, np.asarray(hyperplanes), np, dtype=dtype)


def unit_rows(x, xp=np):
    """``x / max(|x|, EPS)`` row-wise, and the norms ``|x|``."""
    norm = xp.sqrt((x * x).sum(axis=-1))                                     # (..., N)
    return x / xp.maximum(norm, EPS)[..., None], norm
