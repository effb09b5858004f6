"""FAVOR+ on the CPU: the reference's three phases as parallel Numba kernels.

Matches :func:`eff_attn.methods.performer.reference.performer_reference`
(whose module docstring derives the algorithm).

Phases
    1. ``prange`` over (slice, key chunk of ``C``): the logits
       ``lambda(k) = Omega k~ - |k~|^2 / 2`` by ``np.dot``, the chunk's max over
       kept keys; then, once the shifts are fixed on the host, the features
       ``b = exp(lambda - s_c)`` (in place) and the chunk state
       ``S_c = b^T [v, 1]``. Query features ``a`` come from a ``prange`` over
       (slice, query block), each row shifted by its own max.
    2. ``prange`` over (slice, block of feature rows): a sequential scan over
       the chunks of those rows of the states, with the host's factors ``alpha``,
       ``beta`` (causal: the exclusive prefix ``E_c``; non-causal: only the
       total at the global shift).
    3. ``prange`` over (slice, query block) (non-causal: ``a Sigma``) or over
       (slice, chunk) (causal: ``alpha_c a E_c`` plus the in-chunk term
       ``beta_c tril(a b_c^T) [v, 1]_c``).

    Exponentials of the stable form use the vectorised
    :func:`eff_attn._jit.exp_shifted` (every argument is <= 0); the textbook
    form uses ``np.exp`` and is checked for overflow. BLAS is held to one
    thread while ``prange`` owns the cores.

Backward
    The reference's formulas, per task: non-causal, one ``prange`` over
    slices for ``dSigma = a^T dO'``, then (slice, query block) tasks for
    ``dq`` and (slice, key chunk) tasks for ``dk``, ``dv``. Causal: (slice,
    chunk) tasks for ``Q_c = A_c^T dO'_c``, the reverse scan, then one
    (slice, chunk) task per chunk for the gradients of its queries and keys.
    No two tasks write the same row: no atomics.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ..._jit import blas_single_thread, contiguous, exp_shifted, kernel, row_maximum, serial
from ._common import causal_layout, feature_ratio, key_shifts, scan_factors, total_factors
from .reference import add_shift_gradients

__all__ = ["forward", "backward"]


@serial
def _omega(omega, g):
    """The feature matrix of slice ``g`` (shared when there is one)."""
    return omega[g if omega.shape[0] > 1 else 0]


@serial
def _logits(x, om, sqrt_s, lam):
    """``lam <- (sqrt(s) x) Omega^T - |sqrt(s) x|^2 / 2`` for a block of rows, in place; returns ``x~``."""
    B, D = x.shape
    xt = np.empty((B, D), dtype=x.dtype)                                   # (B, D)
    for r in range(B):
        for d in range(D):
            xt[r, d] = x[r, d] * sqrt_s
    np.dot(xt, om.T, lam)                                                  # (B, m)
    for r in range(B):
        half_norm = 0.5 * np.dot(xt[r], xt[r])
        for c in range(lam.shape[1]):
            lam[r, c] -= half_norm
    return xt


@serial
def _to_features(row, shift, eps, ratio, textbook, bits):
    """In place ``row <- ratio (exp(row - shift) + eps)``; textbook: ``exp(row)``, unshifted."""
    if textbook:
        for c in range(row.shape[0]):
            row[c] = np.exp(row[c])
    else:
        exp_shifted(row, shift, bits)
    if eps != 0:
        for c in range(row.shape[0]):
            row[c] += eps
    if ratio != 1:
        for c in range(row.shape[0]):
            row[c] *= ratio


@serial
def _query_range(c, chunk, offset, i_first, Nq):
    """Queries whose positions fall in chunk ``c``: ``[i0, i1)`` (empty when ``i1 <= i0``)."""
    return max(i_first, c * chunk - offset), min(Nq, (c + 1) * chunk - offset)


@serial
def _rows_of(task, n_blocks, block, N):
    """Task ``task`` of a (slice, block) grid: ``(g, first row, one past the last)``."""
    g = task // n_blocks
    r0 = (task % n_blocks) * block
    return g, r0, min(N, r0 + block)


@serial
def _chunk_of(task, n_c, chunk, Nk):
    """Task ``task`` of a (slice, chunk) grid: ``(g, c, j0, j1)`` with keys ``[j0, j1)`` (empty past Nk)."""
    g = task // n_c
    c = task % n_c
    j0 = min(Nk, c * chunk)
    return g, c, j0, min(Nk, j0 + chunk)


@kernel
def _query_features_kernel(q, omega, sqrt_s, eps, ratio, textbook, block, a):
    G, Nq, _ = q.shape
    m = a.shape[2]
    n_blocks = (Nq + block - 1) // block
    for task in prange(G * n_blocks):
        g, i0, i1 = _rows_of(task, n_blocks, block, Nq)
        bits = np.empty(m, dtype=np.int32)
        lam = a[g, i0:i1]                                                  # (B, m) written in place
        _logits(q[g, i0:i1], _omega(omega, g), sqrt_s, lam)
        for r in range(i1 - i0):                                           # shift: each query's own max
            _to_features(lam[r], row_maximum(lam[r]), eps, ratio, textbook, bits)


@kernel
def _key_logits_kernel(k, keep, omega, sqrt_s, chunk, lam, chunk_max):
    G, Nk, _ = k.shape
    n_c = chunk_max.shape[1]
    has_mask = keep.shape[0] > 0
    for task in prange(G * n_c):
        g, c, j0, j1 = _chunk_of(task, n_c, chunk, Nk)
        best = -np.inf
        if j1 > j0:
            _logits(k[g, j0:j1], _omega(omega, g), sqrt_s, lam[g, j0:j1])  # (C, m)
            for j in range(j0, j1):
                if not has_mask or keep[g, j]:
                    best = max(best, row_maximum(lam[g, j]))
        chunk_max[g, c] = best


@kernel
def _key_states_kernel(lam, vx, keep, shifts, eps, ratio, textbook, chunk, S):
    """Features in place over ``lam`` (masked keys 0) and ``S_c = b_c^T vx_c``."""
    G, Nk, m = lam.shape
    n_c = shifts.shape[1]
    has_mask = keep.shape[0] > 0
    for task in prange(G * n_c):
        g, c, j0, j1 = _chunk_of(task, n_c, chunk, Nk)
        bits = np.empty(m, dtype=np.int32)
        for j in range(j0, j1):
            if has_mask and not keep[g, j]:
                for f in range(m):
                    lam[g, j, f] = 0
            else:
                _to_features(lam[g, j], shifts[g, c], eps, ratio, textbook, bits)
        if j1 > j0:
            np.dot(lam[g, j0:j1].T, vx[g, j0:j1], S[g, c])                 # (m, Dv + 1)
        else:
            for f in range(m):
                for e in range(S.shape[3]):
                    S[g, c, f, e] = 0


#: Feature rows per task of the scan: one task streams a contiguous (rows, Dv + 1) block per chunk.
SCAN_ROWS = 16


@kernel
def _scan_kernel(x, decay, gain, reverse, store, out, final):
    """Per (slice, block of feature rows): ``out[c] = acc``; ``acc <- decay_c acc + gain_c x[c]`` over the chunks."""
    G, n_c, m, F = x.shape
    n_blocks = (m + SCAN_ROWS - 1) // SCAN_ROWS
    for task in prange(G * n_blocks):
        g, r0, r1 = _rows_of(task, n_blocks, SCAN_ROWS, m)
        acc = np.empty((r1 - r0, F), dtype=x.dtype)                         # np.zeros would be a nested parfor
        for r in range(r1 - r0):
            for f in range(F):
                acc[r, f] = 0
        # Invariant: acc is the (decayed) sum over the chunks visited so far, at the current chunk's shift.
        for step in range(n_c):
            c = n_c - 1 - step if reverse else step
            if store:
                for r in range(r1 - r0):
                    for f in range(F):
                        out[g, c, r0 + r, f] = acc[r, f]
            d, w = decay[g, c], gain[g, c]
            xc = x[g, c, r0:r1]
            for r in range(r1 - r0):
                for f in range(F):
                    acc[r, f] = d * acc[r, f] + w * xc[r, f]
        for r in range(r1 - r0):
            for f in range(F):
                final[g, r0 + r, f] = acc[r, f]


@kernel
def _outputs_kernel(a, total, block, numden):
    """Non-causal: ``[num, den] = a Sigma`` per (slice, query block)."""
    G, Nq, m = a.shape
    n_blocks = (Nq + block - 1) // block
    for task in prange(G * n_blocks):
        g, i0, i1 = _rows_of(task, n_blocks, block, Nq)
        np.dot(a[g, i0:i1], total[g], numden[g, i0:i1])                    # (B, Dv + 1)


@serial
def _causal_tril(w, i0, j0, offset):
    """Zero ``w[r, t]`` (query ``i0 + r``, key ``j0 + t``) where the key lies after the query's position."""
    for r in range(w.shape[0]):
        first_hidden = max(0, i0 + r + offset + 1 - j0)
        for t in range(first_hidden, w.shape[1]):
            w[r, t] = 0


@kernel
def _causal_outputs_kernel(a, b, vx, E, alpha, beta, offset, i_first, chunk, numden):
    """Causal: ``alpha_c a E_c + beta_c tril(a b_c^T) vx_c`` for the queries of each chunk."""
    G, Nq, m = a.shape
    Nk = b.shape[1]
    n_c = E.shape[1]
    for task in prange(G * n_c):
        g, c, j0, j1 = _chunk_of(task, n_c, chunk, Nk)
        i0, i1 = _query_range(c, chunk, offset, i_first, Nq)
        if i1 <= i0:
            continue
        out = numden[g, i0:i1]                                             # (B, Dv + 1)
        np.dot(a[g, i0:i1], E[g, c], out)                                  # prefix, at shift T_(c-1)
        al = alpha[g, c]
        for r in range(i1 - i0):
            for f in range(out.shape[1]):
                out[r, f] *= al
        if j1 > j0:
            w = np.dot(a[g, i0:i1], b[g, j0:j1].T)                         # (B, C') query x key
            _causal_tril(w, i0, j0, offset)
            inner = np.dot(w, vx[g, j0:j1])                                # (B, Dv + 1)
            be = beta[g, c]
            for r in range(i1 - i0):
                for f in range(out.shape[1]):
                    out[r, f] += be * inner[r, f]


# --- backward ---------------------------------------------------------------------------


@serial
def _logit_grad_to_input(df, f, floor, x, om, sqrt_s, dx, rowsum, valid_rows):
    """Pullback through the features of a block of rows, into ``dx`` and ``rowsum``.

    ``dlambda = df * (f - floor)``, ``dx = sqrt(s) (dlambda Omega - rowsum(dlambda) x~)``.
    Rows with ``valid_rows[r]`` False (masked keys) get 0.
    """
    dlam = df * (f - floor)                                                # (B, m)
    for r in range(dlam.shape[0]):
        if not valid_rows[r]:
            dlam[r] = 0
    np.dot(dlam, om, dx)                                                   # (B, D)
    for r in range(dlam.shape[0]):
        rowsum[r] = dlam[r].sum()
        dx[r] = (dx[r] - rowsum[r] * (x[r] * sqrt_s)) * sqrt_s


@kernel
def _outer_kernel(a, dO, offset, i_first, chunk, causal, out):
    """``out[g, c] = A_c^T dO'_c`` over the queries of chunk ``c``; non-causal: one chunk of all queries."""
    G, Nq, m = a.shape
    n_c = out.shape[1]
    for task in prange(G * n_c):
        g = task // n_c
        c = task % n_c
        i0, i1 = _query_range(c, chunk, offset, i_first, Nq) if causal else (0, Nq)
        if i1 > i0:
            np.dot(a[g, i0:i1].T, dO[g, i0:i1], out[g, c])                 # (m, Dv + 1)
        else:
            out[g, c] = 0


@kernel
def _query_grad_kernel(q, a, dO, total, omega, sqrt_s, floor, block, dq, rowsum):
    """Non-causal queries: ``da = dO' Sigma^T``, then through the features."""
    G, Nq, m = a.shape
    n_blocks = (Nq + block - 1) // block
    for task in prange(G * n_blocks):
        g, i0, i1 = _rows_of(task, n_blocks, block, Nq)
        da = np.dot(dO[g, i0:i1], total[g].T)                              # (B, m)
        valid = np.ones(i1 - i0, dtype=np.bool_)
        _logit_grad_to_input(da, a[g, i0:i1], floor, q[g, i0:i1], _omega(omega, g), sqrt_s,
                             dq[g, i0:i1], rowsum[g, i0:i1], valid)


@kernel
def _key_grad_kernel(k, keep, b, vx, dtotal, beta, omega, sqrt_s, floor, chunk, dk, dv, rowsum):
    """Non-causal keys of each chunk: ``db = beta_c vx dSigma^T``, ``dvx = beta_c b dSigma``."""
    G, Nk, m = b.shape
    Dv = dv.shape[2]
    n_c = beta.shape[1]
    for task in prange(G * n_c):
        g, c, j0, j1 = _chunk_of(task, n_c, chunk, Nk)
        if j1 <= j0:
            continue
        db = np.dot(vx[g, j0:j1], dtotal[g].T) * beta[g, c]                # (C, m)
        dvx = np.dot(b[g, j0:j1], dtotal[g]) * beta[g, c]                  # (C, Dv + 1)
        dv[g, j0:j1] = dvx[:, :Dv]
        valid = _kept_rows(keep, g, j0, j1)
        _logit_grad_to_input(db, b[g, j0:j1], floor, k[g, j0:j1], _omega(omega, g), sqrt_s,
                             dk[g, j0:j1], rowsum[g, j0:j1], valid)


@serial
def _kept_rows(keep, g, j0, j1):
    valid = np.ones(j1 - j0, dtype=np.bool_)
    if keep.shape[0] > 0:
        for j in range(j0, j1):
            valid[j - j0] = keep[g, j]
    return valid


@kernel
def _causal_grad_kernel(q, k, keep, a, b, vx, dO, E, H, alpha, beta, omega, sqrt_s, floor, offset, i_first,
                        chunk, dq, dk, dv, rowsum_q, rowsum_k):
    """Per (slice, chunk): the gradients of the chunk's queries and keys.

    ``U = tril(dO'_c vx_c^T)``, ``W = tril(A_c b_c^T)``; ``da = alpha_c dO'_c E_c^T + beta_c U b_c``,
    ``db = beta_c (vx_c H_c^T + U^T A_c)``, ``dvx = beta_c (b_c H_c + W^T dO'_c)``.
    """
    G, Nq, m = a.shape
    Nk = b.shape[1]
    Dv = dv.shape[2]
    n_c = E.shape[1]
    for task in prange(G * n_c):
        g, c, j0, j1 = _chunk_of(task, n_c, chunk, Nk)
        om = _omega(omega, g)
        i0, i1 = _query_range(c, chunk, offset, i_first, Nq)
        has_q, has_k = i1 > i0, j1 > j0
        nq, nk = max(0, i1 - i0), j1 - j0
        da = np.zeros((nq, m), dtype=a.dtype)                              # (B, m)
        U = np.zeros((nq, nk), dtype=a.dtype)                              # (B, C') query x key
        W = np.zeros((nq, nk), dtype=a.dtype)                              # (B, C')
        if has_q:
            np.dot(dO[g, i0:i1], E[g, c].T, da)                            # from the prefix
            da *= alpha[g, c]
        if has_q and has_k:
            np.dot(dO[g, i0:i1], vx[g, j0:j1].T, U)
            _causal_tril(U, i0, j0, offset)
            np.dot(a[g, i0:i1], b[g, j0:j1].T, W)
            _causal_tril(W, i0, j0, offset)
            da += beta[g, c] * np.dot(U, b[g, j0:j1])
        if has_q:
            valid = np.ones(i1 - i0, dtype=np.bool_)
            _logit_grad_to_input(da, a[g, i0:i1], floor, q[g, i0:i1], om, sqrt_s, dq[g, i0:i1],
                                 rowsum_q[g, i0:i1], valid)
        if has_k:
            db = np.dot(vx[g, j0:j1], H[g, c].T)                           # (C', m) from later chunks
            dvx = np.dot(b[g, j0:j1], H[g, c])                             # (C', Dv + 1)
            if has_q:
                db += np.dot(U.T, a[g, i0:i1])
                dvx += np.dot(W.T, dO[g, i0:i1])
            db *= beta[g, c]
            dvx *= beta[g, c]
            dv[g, j0:j1] = dvx[:, :Dv]
            _logit_grad_to_input(db, b[g, j0:j1], floor, k[g, j0:j1], om, sqrt_s, dk[g, j0:j1],
                                 rowsum_k[g, j0:j1], _kept_rows(keep, g, j0, j1))


# --- entry points ------------------------------------------------------------------------


def _setup(q, k, v, mask, offset, scale, features, variant, chunk_size):
    """Contiguous inputs (masked keys zeroed), ``[v, 1]``, the mask argument and the constants."""
    q, k, v = contiguous(q, k, v)
    G, Nk, _ = k.shape
    dt = q.dtype.type
    vx = np.concatenate([v, np.ones((G, Nk, 1), dtype=v.dtype)], axis=-1)   # (G, Nk, Dv + 1)
    keep = np.empty((0, 0), dtype=np.bool_)
    if mask is not None:                                                     # masked keys never enter the arithmetic
        keep = np.ascontiguousarray(mask)
        k = np.where(keep[..., None], k, 0)
        vx = np.where(keep[..., None], vx, 0)
    omega = np.ascontiguousarray(features, dtype=q.dtype)                    # (G or 1, m, D)
    m = omega.shape[1]
    causal = offset is not None
    if causal:
        n_c, i_first, _, _ = causal_layout(q.shape[1], Nk, offset, chunk_size)
    else:
        n_c, i_first = -(-Nk // chunk_size), 0
    consts = dict(sqrt_s=dt(math.sqrt(scale)), ratio=dt(feature_ratio(variant, m)), textbook=variant == "textbook",
                  offset=0 if offset is None else int(offset), i_first=i_first, n_c=n_c, causal=causal)
    return q, k, np.ascontiguousarray(vx), keep, omega, consts


def _check_textbook(arrays):
    if not all(np.isfinite(x).all() for x in arrays):
        raise FloatingPointError("variant='textbook': exp(lambda) or its sums overflowed; use variant='stable'")


def forward(q, k, v, *, mask, offset, scale, features, num_features, orthogonal, feature_norms, variant, eps,
            chunk_size):
    """The three phases; see the module docstring."""
    q, k, vx, keep, omega, cs = _setup(q, k, v, mask, offset, scale, features, variant, chunk_size)
    G, Nq, _ = q.shape
    Nk, m, F = k.shape[1], omega.shape[1], vx.shape[2]
    dt, n_c = q.dtype.type, cs["n_c"]
    a = np.empty((G, Nq, m), dtype=q.dtype)
    b = np.empty((G, Nk, m), dtype=q.dtype)
    chunk_max = np.empty((G, n_c), dtype=q.dtype)
    S = np.empty((G, n_c, m, F), dtype=q.dtype)
    numden = np.zeros((G, Nq, F), dtype=q.dtype)
    with blas_single_thread():
        _query_features_kernel(q, omega, cs["sqrt_s"], dt(eps), cs["ratio"], cs["textbook"], chunk_size, a)
        _key_logits_kernel(k, keep, omega, cs["sqrt_s"], chunk_size, b, chunk_max)
        shifts = key_shifts(chunk_max, variant, eps)                         # (G, n_c), host
        _key_states_kernel(b, vx, keep, shifts, dt(eps), cs["ratio"], cs["textbook"], chunk_size, S)
        alpha, beta = scan_factors(shifts) if cs["causal"] else (np.ones_like(shifts), total_factors(shifts))
        total = np.empty((G, m, F), dtype=q.dtype)
        E = np.empty_like(S) if cs["causal"] else np.empty((0, 0, 0, 0), dtype=q.dtype)
        _scan_kernel(S, alpha, beta, False, cs["causal"], E, total)
        if cs["causal"]:
            _causal_outputs_kernel(a, b, vx, E, alpha, beta, cs["offset"], cs["i_first"], chunk_size, numden)
        else:
            _outputs_kernel(a, total, chunk_size, numden)
    if cs["textbook"]:
        _check_textbook((a, b, numden))
    den = numden[..., -1]                                                    # (G, Nq)
    out = numden[..., :-1] / np.where(den > 0, den, 1)[..., None]            # (G, Nq, Dv); den = 0 -> 0
    res = dict(a=a, b=b, vx=vx, E=E, total=total, alpha=alpha, beta=beta, den=den, features=features)
    return np.ascontiguousarray(out), res


def backward(dout, q, k, v, out, res, *, mask, offset, scale, features, num_features, orthogonal, feature_norms,
             variant, eps, chunk_size):
    """The reference's backward as parallel kernels; see the module docstring."""
    q, k, vx, keep, omega, cs = _setup(q, k, v, mask, offset, scale, features, variant, chunk_size)
    a, b, den = res["a"], res["b"], res["den"]
    G, Nq, m = a.shape
    Nk, Dv, F = b.shape[1], v.shape[2], vx.shape[2]
    dt, n_c = q.dtype.type, cs["n_c"]
    inv = np.where(den > 0, 1 / np.where(den > 0, den, 1), 0)[..., None]     # (G, Nq, 1)
    h = -np.einsum("gid,gid->gi", dout, out)[..., None] * inv                # (G, Nq, 1)
    dO = np.ascontiguousarray(np.concatenate([dout * inv, h], axis=-1))       # (G, Nq, Dv + 1)
    floor = dt(eps * feature_ratio(variant, m))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros((G, Nk, Dv), dtype=q.dtype)
    rowsum_q, rowsum_k = np.zeros((G, Nq), dtype=q.dtype), np.zeros((G, Nk), dtype=q.dtype)
    sqrt_s = cs["sqrt_s"]
    with blas_single_thread():
        if cs["causal"]:
            alpha, beta = res["alpha"], res["beta"]
            Q = np.empty((G, n_c, m, F), dtype=q.dtype)
            _outer_kernel(a, dO, cs["offset"], cs["i_first"], chunk_size, True, Q)
            H = np.empty_like(Q)
            _scan_kernel(Q, alpha, alpha, True, True, H, np.empty((G, m, F), dtype=q.dtype))
            _causal_grad_kernel(q, k, keep, a, b, vx, dO, res["E"], H, alpha, beta, omega, sqrt_s, floor,
                                cs["offset"], cs["i_first"], chunk_size, dq, dk, dv, rowsum_q, rowsum_k)
        else:
            dtotal = np.empty((G, 1, m, F), dtype=q.dtype)
            _outer_kernel(a, dO, 0, 0, chunk_size, False, dtotal)                 # dSigma = a^T dO'
            dtotal = np.ascontiguousarray(dtotal[:, 0])                           # (G, m, Dv + 1)
            _query_grad_kernel(q, a, dO, res["total"], omega, sqrt_s, floor, chunk_size, dq, rowsum_q)
            _key_grad_kernel(k, keep, b, vx, dtotal, res["beta"], omega, sqrt_s, floor, chunk_size, dk, dv, rowsum_k)
    if eps > 0 and variant == "stable":
        add_shift_gradients(dq, dk, rowsum_q, rowsum_k, a, b, q * sqrt_s, k * sqrt_s, omega, float(sqrt_s))
    return dq, dk, dv
