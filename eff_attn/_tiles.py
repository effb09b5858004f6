"""The online-softmax step that every blocked Numba kernel shares.

Imported only by the Numba backends. A kernel that streams key tiles keeps,
per query row, a running max ``mu``, a running sum ``ell`` and an
accumulator ``acc`` (see ``docs/methods/exact.md``, "The online recurrence").
:func:`online_softmax_step` advances them over one score tile and leaves the
tile's weights in place for the caller's ``P_J v_J`` product;
:func:`finish_row` turns them into the output row and its logsumexp.

Non-finite scores follow the NumPy reference (``eff_attn._softmax``):

- a NaN score makes its row NaN (output and logsumexp), never 0;
- a ``+inf`` score is the limit of a score growing without bound: the row's
  weight goes to the keys scored ``+inf`` (uniformly among them; ``exp(inf -
  inf)`` is read as 1), so the output is that key's value, and ``L = +inf``;
- a row with nothing visible keeps ``mu = -inf``, outputs 0 and ``L = -inf``.
"""

from __future__ import annotations

import numpy as np

from ._jit import _maximum, exp_shifted, row_maximum, serial

__all__ = ["online_softmax_step", "finish_row", "start_rows", "scale_rows", "store_scaled", "set_zero", "add_into"]


@serial
def online_softmax_step(s, mu, ell, acc, bits):
    """One key tile of the online softmax, in place, for every row of ``s``.

    ``s`` (Bq, Bk) holds the tile's scores (``-inf`` where not visible) and
    becomes ``exp(s - mu_new)``; ``mu``, ``ell`` (Bq,) and ``acc`` (Bq, Dv)
    are rescaled by ``alpha = exp(mu - mu_new)``. Invariant, after each tile:
    ``ell_r = sum_{seen j} exp(S_rj - mu_r)`` and ``acc_r = sum_{seen j}
    exp(S_rj - mu_r) v_j``; the caller then adds ``s @ v_J`` to ``acc``.
    ``bits`` is the int32 scratch of :func:`eff_attn._jit.exp_shifted`.
    """
    one, zero = s.dtype.type(1), s.dtype.type(0)
    for r in range(s.shape[0]):
        row = s[r]
        mu_old = mu[r]
        mu_new = _maximum(mu_old, row_maximum(row))                        # NaN if any score so far is NaN
        if mu_new == -np.inf:                                              # nothing visible yet: weights 0
            for c in range(row.shape[0]):
                row[c] = zero
            continue
        if mu_new != mu_new:                                               # a NaN score: the row is NaN
            for c in range(row.shape[0]):
                row[c] = mu_new
            for c in range(acc.shape[1]):
                acc[r, c] = mu_new
            ell[r] = mu_new
            mu[r] = mu_new
            continue
        if mu_new == np.inf:                                               # weight only on the +inf keys
            total = zero
            for c in range(row.shape[0]):
                row[c] = one if row[c] == np.inf else zero
                total += row[c]
            alpha = one if mu_old == np.inf else zero
        else:
            total = exp_shifted(row, mu_new, bits)
            alpha = np.exp(mu_old - mu_new)                                # 0 while mu_old = -inf
        ell[r] = alpha * ell[r] + total
        if alpha != 1:
            for c in range(acc.shape[1]):
                acc[r, c] *= alpha
        mu[r] = mu_new


@serial
def finish_row(acc_r, ell_r, mu_r, out_r):
    """``out_r <- acc_r / ell_r`` and return the logsumexp ``mu_r + log ell_r``.

    Rows that saw nothing (``ell = 0``) get 0 and ``-inf``; a NaN row stays NaN.
    """
    if ell_r > 0 or ell_r != ell_r:
        for c in range(out_r.shape[0]):
            out_r[c] = acc_r[c] / ell_r
        return mu_r + np.log(ell_r)
    for c in range(out_r.shape[0]):
        out_r[c] = 0
    return -np.inf


# The helpers below are explicit loops rather than array expressions (``a[:] = 0``,
# ``a += b``, ``x[g, i0:i1] * scale``): the same work at a fraction of Numba's
# compile time, since every array expression compiles its own ufunc loop,
# broadcasting and shape-error machinery.


@serial
def scale_rows(x, g, i0, scale, out):
    """``out <- x[g, i0:i0 + rows] * scale`` for a (rows, cols) ``out``."""
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            out[r, c] = x[g, i0 + r, c] * scale


@serial
def store_scaled(dst, g, i0, src, scale):
    """``dst[g, i0:i0 + rows] <- src * scale`` for a (rows, cols) ``src``."""
    for r in range(src.shape[0]):
        for c in range(src.shape[1]):
            dst[g, i0 + r, c] = src[r, c] * scale


@serial
def set_zero(a):
    """``a[:] = 0`` for a 2-d array."""
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            a[r, c] = 0


@serial
def add_into(acc, part):
    """``acc += part`` for two (rows, cols) arrays."""
    for r in range(acc.shape[0]):
        for c in range(acc.shape[1]):
            acc[r, c] += part[r, c]


@serial
def start_rows(q, g, i0, scale, qs, mu, ell, acc):
    """Start a block of query rows ``i0..``: ``qs <- q[g, i0:] * scale``, ``mu <- -inf``, ``ell, acc <- 0``."""
    scale_rows(q, g, i0, scale, qs)
    set_zero(acc)
    for r in range(qs.shape[0]):
        mu[r] = -np.inf
        ell[r] = 0
