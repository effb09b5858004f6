"""Randomness, drawn once on the host.

Every random quantity of every method (hyperplanes, random features, sampled
keys, initial centroids) is drawn here or in the method's ``draw_*`` helper,
with NumPy, in float64, and then handed to the backends. At one seed the
NumPy, Numba and CuPy backends therefore compute the same estimate.

``rng`` is ``None`` (fresh entropy on every call), an ``int`` seed, or a
:class:`numpy.random.Generator`.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["as_generator", "gaussian", "orthogonal_gaussian", "random_signs"]


def as_generator(rng) -> np.random.Generator:
    """Turn ``rng`` into a :class:`numpy.random.Generator`.

    Parameters
    ----------
    rng : None, int or numpy.random.Generator
        ``None`` draws fresh OS entropy; an int seeds a new PCG64 generator;
        a Generator is returned as is (and advanced by the caller's draws).

    Raises
    ------
    TypeError
        For anything else, e.g. a legacy ``RandomState``.
    """
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"rng={rng} must be a non-negative seed")
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {type(rng).__name__}")


def gaussian(rng, shape) -> np.ndarray:
    """IID standard normal entries in float64, of shape ``shape``."""
    return as_generator(rng).standard_normal(shape)


def random_signs(rng, shape) -> np.ndarray:
    """IID +1/-1 entries in float64."""
    return as_generator(rng).choice(np.array([-1.0, 1.0]), size=shape)


def orthogonal_gaussian(rng, num_rows: int, dim: int, *, norms: str = "chi", lead_shape=()) -> np.ndarray:
    """Blocks of orthogonal rows whose marginals are standard normal.

    Each block of ``dim`` rows is ``Q diag(sign(diag R))`` from the QR
    factorisation of a Gaussian matrix (the sign fix makes ``Q`` Haar
    distributed). Blocks are stacked and truncated to ``num_rows``.

    Parameters
    ----------
    num_rows, dim : int
    norms : {"chi", "sqrt_d"}
        ``"chi"`` rescales each row to the norm of a fresh Gaussian vector,
        so every row is marginally N(0, I); ``"sqrt_d"`` uses ``sqrt(dim)``.
    lead_shape : tuple of int
        Independent draws for each leading index.

    Returns
    -------
    ndarray of shape (*lead_shape, num_rows, dim), float64
    """
    if norms not in ("chi", "sqrt_d"):
        raise ValueError(f"norms={norms!r} must be 'chi' or 'sqrt_d'")
    gen = as_generator(rng)
    lead_shape = tuple(lead_shape)
    num_blocks = -(-num_rows // dim)
    blocks = []
    for _ in range(num_blocks):
        g = gen.standard_normal((*lead_shape, dim, dim))                      # (..., D, D)
        qmat, rmat = np.linalg.qr(g)                                          # (..., D, D)
        signs = np.sign(np.diagonal(rmat, axis1=-2, axis2=-1))                # (..., D)
        signs = np.where(signs == 0, 1.0, signs)                              # (..., D)
        blocks.append(np.swapaxes(qmat * signs[..., None, :], -1, -2))        # (..., D, D) rows orthonormal
    omega = np.concatenate(blocks, axis=-2)[..., :num_rows, :]               # (..., m, D)
    if norms == "chi":
        row_norms = np.linalg.norm(gen.standard_normal((*lead_shape, num_rows, dim)), axis=-1)
    else:
        row_norms = np.full((*lead_shape, num_rows), np.sqrt(dim))
    return omega * row_norms[..., None]                                       # (..., m, D)
