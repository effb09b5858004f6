"""alpha-entmax on the CPU: per-row threshold kernels and blocked attention.

The core of the entmax transforms, entmax attention and Sparsefinder (which
runs the row threshold over its predicted graph). Matches
:mod:`eff_attn._entmax` and :mod:`eff_attn.methods.entmax.reference`.

Row threshold (:func:`row_threshold`, shared with ``sparsefinder``)
    A row's visible scores are scanned once for the max; only the entries
    with ``x = (alpha - 1)(z - max) > -1`` can be in the support (the
    guaranteed-zero bound), so they alone are gathered, into a float64
    buffer, and the threshold is found on them: by ``np.sort`` and prefix
    sums (alpha = 2, 1.5) or by ``n_iter`` bisection steps over the same
    bracket as the reference (``n`` = the visible count). Nothing longer
    than the row is allocated, and a peaked row costs little beyond its scan.

Attention forward
    ``prange`` over (slice, block of ``Bq`` queries; 128 at D = 64). A task
    computes its (Bq, Nk) score tile with ``np.dot`` in key chunks of
    exact attention's CPU tile size (causal: keys up to the
    block's last position only), finds each row's threshold and sums
    ``p_j v_j`` over the support only. Memory ``O(Bq Nk)`` per task; the
    saved row max, threshold and normaliser rebuild ``P`` for the backward.
    alpha = 1 is the ``exact`` method's blocked online softmax.

Attention backward
    Two passes without atomics, like ``exact``: per query block, the row
    pass rebuilds the support, forms ``dP = dO v^T`` on it and
    ``c_i = sum u dP / sum u``, and accumulates ``dq``; per key block, a
    tile pass rebuilds ``P`` and ``u`` for every query block and
    accumulates ``dk`` and ``dv`` with tile products.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import blas_single_thread, contiguous, exp_shifted, kernel, row_maximum, serial
from ._softmax_numba import blocked_backward, blocked_forward
from ._tiles import add_into, scale_rows, set_zero, store_scaled
from ._tile_sizes import cpu_blocks
from .masks import as_kernel_mask, visible_counts

__all__ = [
    "row_threshold",
    "row_weights",
    "accumulate_support",
    "rows_forward",
    "rows_backward",
    "rows_alpha_grad",
    "forward",
    "backward",
]


@serial
def _power(d, alpha, beta):
    """``d ** beta`` for ``d > 0``, with the common alphas special-cased."""
    if alpha == 2.0:
        return d
    if alpha == 1.5:
        return d * d
    return d ** beta


@serial
def _insertion_sort(a, lo, hi):
    """Sort ``a[lo:hi]`` ascending in place (short ranges)."""
    for i in range(lo + 1, hi):
        x = a[i]
        j = i - 1
        while j >= lo and a[j] > x:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = x


@serial
def _sort(a):
    """Sort the 1-d float array ``a`` ascending, in place (finite values; no NaN).

    Quicksort (median-of-three pivot, the larger part deferred on a stack of
    ``O(log n)`` ranges, short ranges by insertion): as fast as ``np.sort`` on
    these arrays, at a fraction of its compile time.
    """
    stack = np.empty(128, dtype=np.int64)
    top = 0
    lo, hi = 0, a.shape[0]
    while True:
        while hi - lo > 16:
            mid = (lo + hi) // 2                                           # median of three to a[mid]
            if a[mid] < a[lo]:
                a[mid], a[lo] = a[lo], a[mid]
            if a[hi - 1] < a[mid]:
                a[hi - 1], a[mid] = a[mid], a[hi - 1]
                if a[mid] < a[lo]:
                    a[mid], a[lo] = a[lo], a[mid]
            pivot = a[mid]
            i, j = lo, hi - 1                                              # Hoare partition
            while True:
                while a[i] < pivot:
                    i += 1
                while pivot < a[j]:
                    j -= 1
                if i >= j:
                    break
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
            # a[lo:j + 1] <= pivot <= a[j + 1:hi]; defer the larger part
            if j + 1 - lo < hi - j - 1:
                stack[top], stack[top + 1] = j + 1, hi
                hi = j + 1
            else:
                stack[top], stack[top + 1] = lo, j + 1
                lo = j + 1
            top += 2
        _insertion_sort(a, lo, hi)
        if top == 0:
            return
        top -= 2
        lo, hi = stack[top], stack[top + 1]


@serial
def _sort_threshold(xc, nc, alpha, work):
    """Exact threshold from the sorted candidates ``xc[:nc]`` (alpha = 2 or 1.5); ``work`` holds 2 nc floats."""
    xs = work[:nc]
    for c in range(nc):
        xs[c] = xc[c]
    _sort(xs)                                                              # ascending; x_(k) = xs[nc - k]
    if alpha == 2.0:
        c = 0.0
        c_star = xs[nc - 1] if nc > 0 else 0.0
        k_star = 1
        for k in range(1, nc + 1):
            x = xs[nc - k]
            c += x
            if 1.0 + k * x > c:
                k_star = k
                c_star = c
        return (c_star - 1.0) / k_star
    tau_k = work[nc:2 * nc]
    s1 = 0.0
    s2 = 0.0
    count = 0
    for k in range(1, nc + 1):
        x = xs[nc - k]
        s1 += x
        s2 += x * x
        mu = s1 / k
        delta = (1.0 - k * (s2 / k - mu * mu)) / k
        tau_k[k - 1] = mu - np.sqrt(max(delta, 0.0))
        if tau_k[k - 1] <= x:
            count += 1
    return tau_k[max(count, 1) - 1]


@serial
def _bisect_threshold(xc, nc, n_visible, alpha, n_iter):
    """Lower end of the bracket ``[-1, -n**(1-alpha)]`` after ``n_iter`` halvings (test ``f(m) >= 0``)."""
    beta = 1.0 / (alpha - 1.0)
    lo = -1.0
    hi = -(float(n_visible) ** (1.0 - alpha))
    for _ in range(n_iter):
        m = 0.5 * (lo + hi)
        mass = 0.0
        for c in range(nc):
            d = xc[c] - m
            if d > 0:
                mass += _power(d, alpha, beta)
        if mass >= 1.0:
            lo = m
        else:
            hi = m
    return lo


@serial
def row_threshold(z, n, alpha, use_sort, n_iter, cand, xc, work):
    """Threshold of alpha-entmax (alpha > 1) over the ``n`` visible scores ``z[:n]``.

    Fills ``cand[:nc]`` with the positions of the entries that can be in the
    support (``x > -1``) and ``xc[:nc]`` with their shifted values
    ``x = (alpha - 1)(z - max)`` in float64. ``work`` is float64 scratch of
    length ``2 n``. Nothing is allocated: the kernels call this once per row
    from parallel tasks, where allocations contend.

    Returns
    -------
    (nc, z_max, tau) with ``tau`` in shifted units.
    """
    z_max = -np.inf
    for c in range(n):
        if z[c] > z_max:
            z_max = np.float64(z[c])
    a1 = alpha - 1.0
    nc = 0
    for c in range(n):
        x = a1 * (np.float64(z[c]) - z_max)
        if x > -1.0:
            cand[nc] = c
            xc[nc] = x
            nc += 1
    if use_sort:
        tau = _sort_threshold(xc, nc, alpha, work)
    else:
        tau = _bisect_threshold(xc, nc, n, alpha, n_iter)
    return nc, z_max, tau


@serial
def row_weights(xc, nc, tau, alpha, normalise):
    """In place ``xc[:nc] <- [xc - tau]_+ ** beta``, divided by its sum if ``normalise``.

    Returns ``(norm, support)``: the divisor used (1 without ``normalise``) and
    the number of positive weights.
    """
    beta = 1.0 / (alpha - 1.0)
    total = 0.0
    support = 0
    for c in range(nc):
        d = xc[c] - tau
        if d > 0:
            w = _power(d, alpha, beta)
            xc[c] = w
            total += w
            support += 1
        else:
            xc[c] = 0.0
    norm = total if (normalise and total > 0) else 1.0
    if norm != 1.0:
        for c in range(nc):
            xc[c] /= norm
    return norm, support


@serial
def accumulate_support(w, nc, cand, idx, v, g, acc):
    """``acc <- sum_c w[c] v[g, idx[cand[c]]]`` over the positive weights, without temporaries."""
    Dv = acc.shape[0]
    for d in range(Dv):
        acc[d] = 0.0
    for c in range(nc):
        if w[c] > 0:
            j = idx[cand[c]]
            for d in range(Dv):
                acc[d] += w[c] * v[g, j, d]


# --- transforms ---------------------------------------------------------------------

#: Rows per task of the transform kernels.
_ROWS_PER_TASK = 32


@kernel
def _rows_kernel(z, keep, alpha, use_sort, n_iter, ensure_sum_one, p, tau_out, support_out):
    R, n = z.shape
    has_mask = keep.shape[0] > 0
    n_tasks = (R + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(n_tasks):
        zbuf = np.empty(n, dtype=z.dtype)
        idx = np.empty(n, dtype=np.int64)
        cand = np.empty(n, dtype=np.int64)
        xc = np.empty(n, dtype=np.float64)
        work = np.empty(2 * n, dtype=np.float64)
        bits = np.empty(n, dtype=np.int32)
        for row in range(task * _ROWS_PER_TASK, min(R, (task + 1) * _ROWS_PER_TASK)):
            nv = 0
            for j in range(n):
                if not has_mask or keep[row, j]:
                    idx[nv] = j
                    zbuf[nv] = z[row, j]
                    nv += 1
            for j in range(n):
                p[row, j] = 0
            a = alpha[row]
            if nv == 0:
                tau_out[row] = np.inf
                support_out[row] = 0
            elif a == 1.0:                                                 # softmax row
                z_max = row_maximum(zbuf[:nv])
                total = exp_shifted(zbuf[:nv], z_max, bits)
                for c in range(nv):
                    p[row, idx[c]] = zbuf[c] / total
                tau_out[row] = z_max + np.log(total)
                support_out[row] = nv
            else:
                nc, z_max, tau = row_threshold(zbuf, nv, a, use_sort, n_iter, cand, xc, work)
                norm, support = row_weights(xc, nc, tau, a, ensure_sum_one and not use_sort)
                for c in range(nc):
                    p[row, idx[cand[c]]] = xc[c]
                tau_out[row] = tau + (a - 1.0) * z_max
                support_out[row] = support


def _alpha_rows(alpha, R):
    return np.ascontiguousarray(np.broadcast_to(np.asarray(alpha, dtype=np.float64), (R,)))


def rows_forward(z, mask, alpha, *, algorithm, n_iter, ensure_sum_one):
    """Transform entry point over rows ``z (R, n)``; see :func:`eff_attn.methods.entmax.reference.rows_forward`."""
    (z,) = contiguous(z)
    R = z.shape[0]
    alphas = _alpha_rows(1.0 if algorithm == "softmax" else alpha, R)
    p = np.empty_like(z)
    tau = np.empty(R, dtype=np.float64)
    support = np.empty(R, dtype=np.int64)
    _rows_kernel(z, as_kernel_mask(mask), alphas, algorithm == "sort", n_iter, ensure_sum_one, p, tau, support)
    return p, tau.astype(z.dtype), support


@kernel
def _rows_vjp_kernel(p, g, alpha, dz):
    R, n = p.shape
    for row in prange(R):
        e = 2.0 - alpha[row]
        su = 0.0
        ug = 0.0
        for j in range(n):
            if p[row, j] > 0:
                u = np.float64(p[row, j]) ** e
                su += u
                ug += u * g[row, j]
        c = ug / su if su > 0 else 0.0
        for j in range(n):
            if p[row, j] > 0:
                dz[row, j] = (np.float64(p[row, j]) ** e) * (g[row, j] - c)
            else:
                dz[row, j] = 0


@kernel
def _rows_alpha_grad_kernel(p, g, alpha, dalpha):
    R, n = p.shape
    for row in prange(R):
        a = alpha[row]
        su = 0.0
        sh = 0.0
        for j in range(n):
            if p[row, j] > 0:
                pj = np.float64(p[row, j])
                su += pj ** (2.0 - a)
                sh += pj * np.log(pj)
        total = 0.0
        for j in range(n):
            if p[row, j] > 0:
                pj = np.float64(p[row, j])
                pt = pj ** (2.0 - a) / su
                h = pj * np.log(pj)
                total += g[row, j] * ((pj - pt) / (a - 1.0) ** 2 - (h - pt * sh) / (a - 1.0))
        dalpha[row] = total


def rows_backward(p, g, alpha):
    """Transform pullback ``dz = u (g - <u, g> / sum u)``, rows (R, n)."""
    p, g = contiguous(p, g)
    dz = np.empty_like(p)
    _rows_vjp_kernel(p, g, _alpha_rows(alpha, p.shape[0]), dz)
    return dz


def rows_alpha_grad(p, g, alpha):
    """Per-row derivative with respect to alpha, shape (R,)."""
    p, g = contiguous(p, g)
    dalpha = np.empty(p.shape[0], dtype=np.float64)
    _rows_alpha_grad_kernel(p, g, _alpha_rows(alpha, p.shape[0]), dalpha)
    return dalpha


# --- attention ----------------------------------------------------------------------


@serial
def _visible_row(s_row, end, keep, g, zbuf, idx):
    """Gather the visible scores of a tile row (keys ``< end`` kept by the mask); returns their count."""
    has_mask = keep.shape[0] > 0
    n = 0
    for j in range(end):
        if not has_mask or keep[g, j]:
            idx[n] = j
            zbuf[n] = s_row[j]
            n += 1
    return n


@serial
def _score_tile(qs, keys, tile, part_buf, block_k):
    """``tile <- qs keys^T`` in key chunks of ``block_k``, each product within exact
    attention's CPU tile size (see :func:`eff_attn._tile_sizes.cpu_blocks`)."""
    bq, k_end = tile.shape
    for j0 in range(0, k_end, block_k):
        j1 = min(k_end, j0 + block_k)
        part = part_buf[: bq * (j1 - j0)].reshape((bq, j1 - j0))
        np.dot(qs, keys[j0:j1].T, part)
        for r in range(bq):
            for c in range(j1 - j0):
                tile[r, j0 + c] = part[r, c]


@serial
def _scaled_rows(q, g, i0, i1, scale):
    """A new (i1 - i0, D) array ``q[g, i0:i1] * scale``, as an explicit loop (cheaper to compile)."""
    qs = np.empty((i1 - i0, q.shape[2]), dtype=q.dtype)
    scale_rows(q, g, i0, scale, qs)
    return qs


@serial
def _task_rows(task, n_blocks, block_q, Nq, Nk, causal, offset):
    """Slice ``g`` and query rows ``[i0, i1)`` of a task; keys ``>= k_end`` are invisible to all of them."""
    g = task // n_blocks
    i0 = (task % n_blocks) * block_q
    i1 = min(Nq, i0 + block_q)
    k_end = Nk if not causal else min(Nk, max(0, i1 + offset))
    return g, i0, i1, k_end


@kernel
def _forward_kernel(q, k, v, keep, causal, offset, scale, alpha, use_sort, n_iter, ensure_sum_one, block_q, block_k,
                    out, z_max_out, tau_out, norm_out, support_out):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    n_blocks = (Nq + block_q - 1) // block_q
    for task in prange(G * n_blocks):
        g, i0, i1, k_end = _task_rows(task, n_blocks, block_q, Nq, Nk, causal, offset)
        bq = i1 - i0
        tile = np.empty((bq, k_end), dtype=q.dtype)                         # (Bq, k_end) scores
        _score_tile(_scaled_rows(q, g, i0, i1, scale), k[g], tile, np.empty(bq * block_k, dtype=q.dtype), block_k)
        zbuf = np.empty(k_end, dtype=q.dtype)
        idx = np.empty(k_end, dtype=np.int64)
        cand = np.empty(k_end, dtype=np.int64)
        xc = np.empty(k_end, dtype=np.float64)
        work = np.empty(2 * k_end, dtype=np.float64)
        acc = np.empty(Dv, dtype=np.float64)
        a = alpha[g]
        for r in range(bq):
            i = i0 + r
            end = k_end if not causal else min(k_end, max(0, i + offset + 1))
            n = _visible_row(tile[r], end, keep, g, zbuf, idx)
            if n == 0:
                for d in range(Dv):
                    out[g, i, d] = 0
                z_max_out[g, i] = 0.0
                tau_out[g, i] = np.inf
                norm_out[g, i] = 1.0
                support_out[g, i] = 0
                continue
            nc, z_max, tau = row_threshold(zbuf, n, a, use_sort, n_iter, cand, xc, work)
            norm, support = row_weights(xc, nc, tau, a, ensure_sum_one and not use_sort)
            accumulate_support(xc, nc, cand, idx, v, g, acc)
            for d in range(Dv):
                out[g, i, d] = acc[d]
            z_max_out[g, i] = z_max
            tau_out[g, i] = tau
            norm_out[g, i] = norm
            support_out[g, i] = support


def _kernel_args(q, mask, offset, scale):
    return as_kernel_mask(mask), offset is not None, 0 if offset is None else int(offset), q.dtype.type(scale)


def forward(q, k, v, *, mask, offset, scale, alpha, algorithm, n_iter):
    """Blocked entmax forward; alpha = 1 runs ``exact``'s online softmax."""
    q, k, v = contiguous(q, k, v)
    G, Nq, _ = q.shape
    if algorithm == "softmax":
        out, res = blocked_forward(q, k, v, mask=mask, offset=offset, scale=scale)
        support = np.ascontiguousarray(np.broadcast_to(visible_counts(mask, offset, Nq, k.shape[1]), (G, Nq)))
        tau = np.where(support > 0, res["lse"], np.inf).astype(q.dtype)        # p = exp(S - tau)
        return out, {"tau": tau, "support_size": support, "lse": res["lse"]}
    out = np.empty((G, Nq, v.shape[2]), dtype=q.dtype)
    z_max = np.empty((G, Nq))
    tau = np.empty((G, Nq))
    norm = np.empty((G, Nq))
    support = np.empty((G, Nq), dtype=np.int64)
    alphas = _alpha_rows(alpha, G)
    block_q, block_k = cpu_blocks(q.shape[2], v.shape[2])
    with blas_single_thread():
        _forward_kernel(q, k, v, *_kernel_args(q, mask, offset, scale), alphas, algorithm == "sort", n_iter, True,
                        block_q, block_k, out, z_max, tau, norm, support)
    a = alphas[:, None]
    tau_user = np.where(support > 0, tau + (a - 1) * z_max, np.inf).astype(q.dtype)
    return out, {"tau": tau_user, "support_size": support, "z_max": z_max, "tau_shifted": tau, "norm": norm}


@serial
def _tile_probabilities(s, keep, g, i0, j0, causal, offset, a, z_max, tau, norm):
    """In place: ``s <- [(a - 1)(s - z_max_i) - tau_i]_+ ** beta / norm_i`` on visible entries, 0 elsewhere."""
    bq, bk = s.shape
    has_mask = keep.shape[0] > 0
    beta = 1.0 / (a - 1.0)
    for r in range(bq):
        i = i0 + r
        limit = bk if not causal else min(bk, max(0, i + offset + 1 - j0))
        for c in range(bk):
            if c >= limit or (has_mask and not keep[g, j0 + c]) or tau[g, i] == np.inf:
                s[r, c] = 0
                continue
            d = (a - 1.0) * (np.float64(s[r, c]) - z_max[g, i]) - tau[g, i]
            s[r, c] = _power(d, a, beta) / norm[g, i] if d > 0 else 0.0


@kernel
def _backward_q_kernel(q, k, v, dout, keep, causal, offset, scale, alpha, block_q, block_k, z_max, tau, norm, dq,
                       row_c):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    n_blocks = (Nq + block_q - 1) // block_q
    for task in prange(G * n_blocks):
        g, i0, i1, k_end = _task_rows(task, n_blocks, block_q, Nq, Nk, causal, offset)
        bq = i1 - i0
        tile = np.empty((bq, k_end), dtype=q.dtype)
        _score_tile(_scaled_rows(q, g, i0, i1, scale), k[g], tile, np.empty(bq * block_k, dtype=q.dtype), block_k)
        a = alpha[g]
        beta = 1.0 / (a - 1.0)
        acc = np.empty(D, dtype=np.float64)
        for r in range(bq):
            i = i0 + r
            for e in range(D):
                dq[g, i, e] = 0
            row_c[g, i] = 0.0
            if tau[g, i] == np.inf:
                continue
            end = k_end if not causal else min(k_end, max(0, i + offset + 1))
            has_mask = keep.shape[0] > 0
            su = 0.0
            sud = 0.0
            for j in range(end):                                           # c_i = sum u dP / sum u
                if has_mask and not keep[g, j]:
                    continue
                d = (a - 1.0) * (np.float64(tile[r, j]) - z_max[g, i]) - tau[g, i]
                if d > 0:
                    u = (_power(d, a, beta) / norm[g, i]) ** (2.0 - a)
                    su += u
                    sud += u * np.dot(dout[g, i], v[g, j])
            c = sud / su if su > 0 else 0.0
            row_c[g, i] = c
            for e in range(D):
                acc[e] = 0.0
            for j in range(end):                                           # dq_i = s sum_j dS_ij k_j
                if has_mask and not keep[g, j]:
                    continue
                d = (a - 1.0) * (np.float64(tile[r, j]) - z_max[g, i]) - tau[g, i]
                if d > 0:
                    u = (_power(d, a, beta) / norm[g, i]) ** (2.0 - a)
                    w = u * (np.dot(dout[g, i], v[g, j]) - c)
                    for e in range(D):
                        acc[e] += w * k[g, j, e]
            for e in range(D):
                dq[g, i, e] = acc[e] * scale


@kernel
def _backward_kv_kernel(q, k, v, dout, keep, causal, offset, scale, alpha, block_q, block_k, z_max, tau, norm, row_c,
                        dk, dv):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    n_blocks = (Nk + block_k - 1) // block_k
    for task in prange(G * n_blocks):
        g = task // n_blocks
        j0 = (task % n_blocks) * block_k
        j1 = min(Nk, j0 + block_k)
        bk = j1 - j0
        a = alpha[g]
        ks = np.empty((bk, D), dtype=q.dtype)                              # (Bk, D)
        scale_rows(k, g, j0, scale, ks)
        dk_acc = np.empty((bk, D), dtype=q.dtype)
        dv_acc = np.empty((bk, Dv), dtype=q.dtype)
        set_zero(dk_acc)
        set_zero(dv_acc)
        dk_part = np.empty((bk, D), dtype=q.dtype)
        dv_part = np.empty((bk, Dv), dtype=q.dtype)
        p_buf = np.empty(block_q * bk, dtype=q.dtype)
        ds_buf = np.empty(block_q * bk, dtype=q.dtype)
        first = 0 if not causal else max(0, j0 - offset)                   # first i with i + offset >= j0
        for i0 in range(first, Nq, block_q):
            i1 = min(Nq, i0 + block_q)
            bq = i1 - i0
            p = p_buf[: bq * bk].reshape((bq, bk))
            ds = ds_buf[: bq * bk].reshape((bq, bk))
            np.dot(q[g, i0:i1], ks.T, p)                                   # (Bq, Bk) scores
            _tile_probabilities(p, keep, g, i0, j0, causal, offset, a, z_max, tau, norm)   # (Bq, Bk) P
            np.dot(p.T, dout[g, i0:i1], dv_part)                           # (Bk, Dv)
            add_into(dv_acc, dv_part)
            np.dot(dout[g, i0:i1], v[g, j0:j1].T, ds)                      # (Bq, Bk) dP
            for r in range(bq):                                            # dS = u (dP - c_i)
                for c in range(bk):
                    if p[r, c] > 0:
                        ds[r, c] = (p[r, c] ** (2.0 - a)) * (ds[r, c] - row_c[g, i0 + r])
                    else:
                        ds[r, c] = 0
            np.dot(ds.T, q[g, i0:i1], dk_part)                             # (Bk, D)
            add_into(dk_acc, dk_part)
        store_scaled(dk, g, j0, dk_acc, scale)
        store_scaled(dv, g, j0, dv_acc, q.dtype.type(1))


def backward(dout, q, k, v, out, res, *, mask, offset, scale, alpha, algorithm, **params):
    """Two-pass backward from the saved row max, threshold and normaliser."""
    q, k, v, dout = contiguous(q, k, v, dout)
    if algorithm == "softmax":
        return blocked_backward(dout, q, k, v, out, {"lse": res["lse"]}, mask=mask, offset=offset, scale=scale)
    G, Nq, _ = q.shape
    alphas = _alpha_rows(alpha, G)
    keep, causal, off, s = _kernel_args(q, mask, offset, scale)
    saved = (res["z_max"], res["tau_shifted"], res["norm"])
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    row_c = np.empty((G, Nq))
    block_q, block_k = cpu_blocks(q.shape[2], v.shape[2])
    with blas_single_thread():
        _backward_q_kernel(q, k, v, dout, keep, causal, off, s, alphas, block_q, block_k, *saved, dq, row_c)
        _backward_kv_kernel(q, k, v, dout, keep, causal, off, s, alphas, block_q, block_k, *saved, row_c, dk, dv)
    return dq, dk, dv
