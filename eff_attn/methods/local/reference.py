"""Local (sliding-window) attention in NumPy, by sliding chunks.

Per (batch, head) slice, query ``i`` at position ``p_i = i + o`` attends the
band ``B_i = {j visible : p_i - wL <= j <= p_i + wR}`` with exact softmax::

    out_i = sum_{j in B_i} exp(S_ij - mu_i) v_j / sum_{j in B_i} exp(S_ij - mu_i)

Sliding chunks never form the (Nq, Nk) score matrix. Cut the queries into
chunks of ``c``. Chunk ``u`` holds queries ``[uc, uc + c)``; their bands all
lie inside one window of ``W = c + wL + wR`` keys starting at
``start_u = uc + o - wL``. In that window, query row ``r`` and key slot ``t``
are in the band exactly when ``0 <= t - r <= wL + wR``: the band is the same
diagonal strip in every chunk. So::

    windows    k_win[u, t] = k[start_u + t]        (G, n_ch, W, D), a strided view
    scores     S[u] = s q[u] k_win[u]^T            (G, n_ch, c, W)
    band mask  0 <= t - r <= wL + wR, key kept and inside [0, Nk)
    softmax    then P[u] v_win[u]                  (G, n_ch, c, Dv)

Time ``O(Nq W (D + Dv))``, memory ``O(Nq W)``: linear in the sequence length
for a fixed window. The functions take the array module ``xp``; the CuPy
backend runs the backward as is.
"""

from __future__ import annotations

import numpy as np

from ..._array import swap_last
from ..._softmax import softmax_attend, softmax_attend_backward
from ._common import DEFAULT_CHUNK, band, band_result, chunk_geometry

__all__ = ["SlidingChunks", "sliding_windows", "overlap_add", "band_visibility", "local_reference", "local_backward",
           "forward", "backward"]


def sliding_windows(x, start: int, n_chunks: int, chunk: int, width: int, xp=np):
    """Overlapping row windows ``out[g, u, t] = x[g, start + u*chunk + t]``, 0 outside ``[0, N)``.

    A strided view of a zero-padded copy of ``x`` (G, N, F): consecutive
    windows share ``width - chunk`` rows, and nothing is copied per window.

    Returns
    -------
    array of shape (G, n_chunks, width, F)
    """
    G, N, F = x.shape
    front = max(0, -start)                                                  # rows of zeros before x
    back = max(0, start + (n_chunks - 1) * chunk + width - N)               # rows of zeros after x
    padded = xp.concatenate([xp.zeros((G, front, F), x.dtype), x, xp.zeros((G, back, F), x.dtype)], axis=1)
    base = padded[:, start + front:]                                        # row 0 is position `start`
    s0, s1, s2 = base.strides
    return xp.lib.stride_tricks.as_strided(base, shape=(G, n_chunks, width, F), strides=(s0, chunk * s1, s1, s2))


def overlap_add(windows, start: int, chunk: int, N: int, xp=np):
    """Adjoint of :func:`sliding_windows`: add every window slot back onto its row.

    ``out[g, start + u*chunk + t] += windows[g, u, t]`` for rows in ``[0, N)``.
    Windows overlap, so the slots are added in blocks of ``chunk``: within
    one block of slots the chunks' targets are disjoint rows, and one
    ``+=`` adds them all. ``ceil(width / chunk)`` vectorised additions.

    Returns
    -------
    array of shape (G, N, F)
    """
    G, n_ch, W, F = windows.shape
    n_blocks = -(-W // chunk)
    acc = xp.zeros((G, n_ch + n_blocks, chunk, F), dtype=windows.dtype)   # row (a, r) is position start + a*chunk + r
    for b in range(n_blocks):
        t0, t1 = b * chunk, min(W, (b + 1) * chunk)
        acc[:, b : b + n_ch, : t1 - t0] += windows[:, :, t0:t1]             # chunk u's slots t0.. land on block u + b
    acc = acc.reshape(G, -1, F)                                             # (G, T, F), row t' is position start + t'
    out = xp.zeros((G, N, F), dtype=windows.dtype)                          # (G, N, F)
    j0, j1 = max(0, start), min(N, start + acc.shape[1])
    if j1 > j0:
        out[:, j0:j1] = acc[:, j0 - start : j1 - start]
    return out


def band_visibility(mask, start: int, n_chunks: int, chunk: int, width: int, span: int, Nk: int, xp=np):
    """Visible (row, slot) pairs of every chunk, shape (G or 1, n_chunks, chunk, width).

    Slot ``t`` of chunk ``u`` is key ``start + u*chunk + t``; row ``r`` sees it
    when ``0 <= t - r <= span`` (``span = wL + wR``), the key exists and is kept.
    """
    kept = xp.ones((1, Nk, 1), dtype=bool) if mask is None else mask[..., None]     # (G|1, Nk, 1)
    kept_win = sliding_windows(kept, start, n_chunks, chunk, width, xp)[..., 0]     # (G|1, n_ch, W)
    diag = xp.arange(width)[None, :] - xp.arange(chunk)[:, None]                     # (c, W) t - r
    in_band = (diag >= 0) & (diag <= span)                                          # (c, W)
    return in_band & kept_win[:, :, None, :]                                        # (G|1, n_ch, c, W)


def _pad_rows(x, rows: int, xp=np):
    """``x`` (G, N, F) with zero rows appended up to ``rows``."""
    extra = rows - x.shape[1]
    return x if extra == 0 else xp.concatenate([x, xp.zeros((x.shape[0], extra, x.shape[2]), x.dtype)], axis=1)


class SlidingChunks:
    """The sliding-chunks views of one call: query chunks, key and value windows."""

    def __init__(self, q, k, v, mask, offset, window, chunk, xp):
        G, Nq, D = q.shape
        Nk = k.shape[1]
        self.o, self.wL, self.wR = band(offset, Nq, Nk, window)
        self.c, self.n_ch, self.W = chunk_geometry(Nq, chunk, self.wL, self.wR)
        self.start = self.o - self.wL                                        # first key slot of chunk 0
        if mask is not None:                                                 # masked keys never enter the arithmetic
            k = xp.where(mask[..., None], k, 0)
            v = xp.where(mask[..., None], v, 0)
        args = (self.start, self.n_ch, self.c, self.W, xp)
        self.xp = xp
        self.q = self.split(q)                                               # (G, n_ch, c, D)
        self.k = sliding_windows(k, *args)                                   # (G, n_ch, W, D)
        self.v = sliding_windows(v, *args)                                   # (G, n_ch, W, Dv)
        self.mask, self.Nk = mask, Nk

    def visibility(self):
        """The band mask of every chunk, (G|1, n_ch, c, W)."""
        return band_visibility(self.mask, self.start, self.n_ch, self.c, self.W, self.wL + self.wR, self.Nk, self.xp)

    def split(self, x):
        """Rows (G, Nq, F) into zero-padded chunks (G, n_ch, c, F)."""
        x = _pad_rows(x, self.n_ch * self.c, self.xp)
        return x.reshape(x.shape[0], self.n_ch, self.c, x.shape[2])

    def rows(self, x, Nq):
        """Chunked rows (G, n_ch, c, ...) back to (G, Nq, ...), dropping the padding."""
        return x.reshape(x.shape[0], self.n_ch * self.c, *x.shape[3:])[:, :Nq]


def local_reference(q, k, v, *, mask=None, offset=None, scale, window, chunk=DEFAULT_CHUNK, xp=np):
    """Sliding-window attention by sliding chunks.

    Parameters
    ----------
    q : ndarray of shape (G, Nq, D)
    k : ndarray of shape (G, Nk, D)
    v : ndarray of shape (G, Nk, Dv)
    mask : bool ndarray of shape (G, Nk), optional
    offset : int, optional
        Causal offset; None when not causal (the band then uses ``Nk - Nq``).
    scale : float
    window : pair of int
        ``(wL, wR)``.
    chunk : int
        Queries per chunk ``c``.

    Returns
    -------
    out : ndarray of shape (G, Nq, Dv)
    lse : ndarray of shape (G, Nq)
        The band's logsumexp, ``-inf`` for rows with an empty band.
    chunks : SlidingChunks
        The geometry, for the diagnostics.
    """
    Nq = q.shape[1]
    ch = SlidingChunks(q, k, v, mask, offset, window, chunk, xp)
    scores = scale * (ch.q @ swap_last(ch.k))                               # (G, n_ch, c, W)
    out, lse, _ = softmax_attend(scores, ch.visibility(), ch.v, xp)              # (G, n_ch, c, Dv), (G, n_ch, c)
    return ch.rows(out, Nq), ch.rows(lse[..., None], Nq)[..., 0], ch        # (G, Nq, Dv), (G, Nq)


def local_backward(dout, q, k, v, out, lse, *, mask=None, offset=None, scale, window, chunk=DEFAULT_CHUNK, xp=np):
    """Gradients of local attention: the exact backward, restricted to the band.

    With ``P = exp(S - L)`` on the band (0 elsewhere) and ``delta_i = dO_i . O_i``::

        dv = P^T dO,   dS = P * (dO v^T - delta),   dq = s dS k,   dk = s dS^T q

    computed per chunk on the windows; the window gradients of k and v go
    back to their rows by :func:`overlap_add`. Time and memory as the forward.

    Returns
    -------
    dq : ndarray of shape (G, Nq, D)
    dk : ndarray of shape (G, Nk, D)
    dv : ndarray of shape (G, Nk, Dv)
    """
    Nq, Nk = q.shape[1], k.shape[1]
    ch = SlidingChunks(q, k, v, mask, offset, window, chunk, xp)
    scores = xp.where(ch.visibility(), scale * (ch.q @ swap_last(ch.k)), -xp.inf)  # (G, n_ch, c, W)
    L = ch.split(xp.where(xp.isfinite(lse), lse, 0)[..., None])               # (G, n_ch, c, 1)
    P = xp.exp(scores - L)                                                   # (G, n_ch, c, W); 0 off the band
    dS, dv_win = softmax_attend_backward(ch.split(dout), ch.split(out), P, ch.v, xp)  # (.., c, W), (.., W, Dv)
    dq = ch.rows(scale * (dS @ ch.k), Nq)                                    # (G, Nq, D)
    dk_win = scale * (swap_last(dS) @ ch.q)                                  # (G, n_ch, W, D)
    dk = overlap_add(dk_win, ch.start, ch.c, Nk, xp)                         # (G, Nk, D)
    dv = overlap_add(dv_win, ch.start, ch.c, Nk, xp)                         # (G, Nk, Dv)
    return dq, dk, dv


def forward(q, k, v, *, mask, offset, scale, window, block_q=None, block_k=None, xp=np):
    """Backend entry point: sliding chunks of ``block_q`` (default 64) queries."""
    chunk = block_q or DEFAULT_CHUNK
    out, lse, ch = local_reference(q, k, v, mask=mask, offset=offset, scale=scale, window=window, chunk=chunk, xp=xp)
    G, Nq = lse.shape
    res = {"lse": lse, "block_q": ch.c}
    return out, band_result(res, mask, ch.o, ch.wL, ch.wR, Nq, k.shape[1], xp, G * ch.n_ch * ch.c * ch.W)


def backward(dout, q, k, v, out, res, *, mask, offset, scale, window, block_q=None, block_k=None, xp=np):
    """Backend entry point for the pullback."""
    return local_backward(dout, q, k, v, out, res["lse"], mask=mask, offset=offset, scale=scale, window=window,
                          chunk=block_q or DEFAULT_CHUNK, xp=xp)
