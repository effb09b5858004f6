"""Error measures between an approximate and an exact attention output.

Every measure is computed per (batch, head) slice: arrays of shape
(..., Nq, Dv) give results of shape (...). Reduce them as you need (the
benchmarks report the median and the 90th percentile over heads and seeds).
Inputs are promoted to float64 before any arithmetic.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "rel_frobenius",
    "rel_spectral",
    "spectral_norm",
    "max_abs_error",
    "relative_max_abs",
    "uniform_output",
    "err_over_uniform",
    "support_recall",
    "row_entropy",
    "SpectralError",
    "spectral_error",
]

_TINY = np.finfo(np.float64).tiny


def _host64(x) -> np.ndarray:
    if hasattr(x, "get"):  # CuPy array
        x = x.get()
    return np.asarray(x, dtype=np.float64)


def _ratio(num, den):
    """``num / den`` with 0/0 = 0 and x/0 = inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))


def rel_frobenius(approx, exact):
    """``||approx - exact||_F / ||exact||_F`` per slice, shape (...)."""
    a, e = _host64(approx), _host64(exact)
    return _ratio(np.linalg.norm(a - e, axis=(-2, -1)), np.linalg.norm(e, axis=(-2, -1)))


def spectral_norm(x):
    """Largest singular value per slice of ``x`` (..., m, n), shape (...).

    ``||x||_2 = sqrt(lambda_max(G))`` with the Gram matrix ``G = x^T x`` of
    size ``min(m, n)``: for an attention output (N x Dv, N >> Dv) that is a
    Dv x Dv eigenproblem instead of an SVD of the whole output, dozens of
    times faster at the same float64 accuracy (``lambda_max = ||x||_2^2``, so
    its rounding error relative to ``||x||_2^2`` is a few ulps).
    """
    x = _host64(x)
    xt = np.swapaxes(x, -1, -2)                                            # (..., n, m)
    gram = xt @ x if x.shape[-2] >= x.shape[-1] else x @ xt                # (..., p, p), p = min(m, n)
    if gram.shape[-1] == 0:
        return np.zeros(x.shape[:-2])
    top = np.linalg.eigvalsh(gram)[..., -1]                                # (...,) lambda_max
    return np.sqrt(np.maximum(top, 0.0))


def rel_spectral(approx, exact):
    """``||approx - exact||_2 / ||exact||_2`` per slice (largest singular values, :func:`spectral_norm`)."""
    a, e = _host64(approx), _host64(exact)
    return _ratio(spectral_norm(a - e), spectral_norm(e))


def max_abs_error(approx, exact):
    """``max |approx - exact|`` per slice, shape (...)."""
    a, e = _host64(approx), _host64(exact)
    return np.abs(a - e).max(axis=(-2, -1), initial=0.0)


def relative_max_abs(approx, exact) -> float:
    """Max-abs difference over the max-abs entry of ``exact``, one number.

    This is the tolerance measure of the backend-agreement tests.
    """
    a, e = _host64(approx), _host64(exact)
    scale = np.abs(e).max(initial=0.0)
    diff = np.abs(a - e).max(initial=0.0)
    return float(diff / scale) if scale > 0 else float(diff)


def uniform_output(v, mask=None, offset=None, Nq=None):
    """The know-nothing estimate: the mean of the visible values of each query.

    Parameters
    ----------
    v : array of shape (..., Nk, Dv)
    mask : bool array of shape (..., Nk), optional
    offset : int, optional
        Causal offset (see :mod:`eff_attn.masks`); requires ``Nq``.
    Nq : int, optional
        Number of queries; defaults to 1 row when non-causal.

    Returns
    -------
    ndarray of shape (..., Nq, Dv), float64; rows with no visible key are 0.
    """
    from .masks import visible_pairs

    v = _host64(v)
    Nk = v.shape[-2]
    Nq = 1 if Nq is None else Nq
    visible = visible_pairs(None if mask is None else _host64(mask) > 0, offset, Nq, Nk)  # (..., Nq, Nk)
    weights = visible.astype(np.float64)                                                   # (..., Nq, Nk)
    counts = weights.sum(-1, keepdims=True)                                                # (..., Nq, 1)
    return (weights @ v) / np.where(counts > 0, counts, 1.0)                               # (..., Nq, Dv)


def err_over_uniform(approx, exact, uniform, measure=rel_frobenius):
    """``err(approx) / err(uniform)`` per slice: below 1 beats knowing nothing."""
    return _ratio(measure(approx, exact), measure(np.broadcast_to(_host64(uniform), np.shape(exact)), exact))


def support_recall(predicted, true):
    """Share of the true support that the predicted support covers, per slice.

    Parameters
    ----------
    predicted, true : bool arrays of shape (..., Nq, Nk)
    """
    predicted, true = np.asarray(predicted, bool), np.asarray(true, bool)
    hits = (predicted & true).sum(axis=(-2, -1))
    return _ratio(hits.astype(np.float64), true.sum(axis=(-2, -1)).astype(np.float64))


def row_entropy(p):
    """Shannon entropy ``-sum_j p_ij log p_ij`` of each attention row, shape (..., Nq)."""
    p = _host64(p)
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(-1)


class SpectralError(NamedTuple):
    """Result of :func:`spectral_error`: the mean over slices, and how many were skipped."""

    mean: float
    skipped: int


def spectral_error(out, ref, *, normalise="output", q=None, k=None, v=None, mask=None, scale=None) -> SpectralError:
    """Spectral-norm error of an attention output, averaged over slices.

    Per (batch, head) slice, in float64, with ``||.||_2`` the largest
    singular value:

    - ``normalise="output"``: ``||out - ref||_2 / ||ref||_2``;
    - ``normalise="paper"``: ``||out - ref||_2 / (||D^-1 A||_2 ||V||_2)``
      over the kept keys, the normalisation of the KDEformer bound
      (Zandieh et al. 2023), which needs ``q``, ``k`` and ``v``.

    Slices whose denominator is 0 (e.g. ``ref = 0``) are skipped.

    Parameters
    ----------
    out, ref : arrays of shape (..., Nq, Dv)
        Approximate and exact outputs.
    normalise : {"output", "paper"}, default="output"
    q : array of shape (..., Nq, D), optional
    k : array of shape (..., Nk, D), optional
    v : array of shape (..., Nk, Dv), optional
    mask : bool array of shape (..., Nk), optional
        Key keep-mask of the ``"paper"`` normalisation.
    scale : float, optional
        Score scale, default ``1/sqrt(D)``.

    Returns
    -------
    SpectralError
        ``mean`` over the slices that were not skipped (0.0 if all were),
        and the number ``skipped``.
    """
    a, e = _host64(out), _host64(ref)
    num = spectral_norm(a - e)                                                          # (...)
    if normalise == "output":
        den = spectral_norm(e)                                                          # (...)
    elif normalise == "paper":
        if q is None or k is None or v is None:
            raise ValueError('normalise="paper" needs q, k and v')
        q, k, v = _host64(q), _host64(k), _host64(v)
        s = (1.0 / np.sqrt(q.shape[-1]) if scale is None else scale) * (q @ np.swapaxes(k, -1, -2))
        keep = np.ones(k.shape[:-1], dtype=bool) if mask is None else np.asarray(_host64(mask) > 0)
        s = np.where(keep[..., None, :], s, -np.inf)                                    # (..., Nq, Nk)
        row_max = s.max(axis=-1, keepdims=True)                                         # (..., Nq, 1)
        e_s = np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0))                  # (..., Nq, Nk)
        total = e_s.sum(axis=-1, keepdims=True)                                         # (..., Nq, 1)
        P = e_s / np.where(total > 0, total, 1.0)                                       # (..., Nq, Nk) D^-1 A
        v_kept = np.where(keep[..., None], v, 0.0)                                      # (..., Nk, Dv)
        den = np.linalg.norm(P, ord=2, axis=(-2, -1)) * np.linalg.norm(v_kept, ord=2, axis=(-2, -1))
        den = np.broadcast_to(den, num.shape)
    else:
        raise ValueError(f'normalise={normalise!r} is not one of "output", "paper"')
    ok = den > 0
    skipped = int(np.size(ok) - np.count_nonzero(ok))
    mean = float((num[ok] / den[ok]).mean()) if ok.any() else 0.0
    return SpectralError(mean=mean, skipped=skipped)
