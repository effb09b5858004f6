"""alpha-entmax on the GPU: cuBLAS scores and one row-threshold kernel.

The core of the entmax transforms, entmax attention and Sparsefinder (which
runs the row threshold over its predicted graph). Matches
:mod:`eff_attn._entmax` and :mod:`eff_attn.methods.entmax.reference`.

Row threshold (:func:`row_threshold_kernel`, shared with ``sparsefinder``)
    One thread block per row of a flat value array (row ``r`` is
    ``vals[starts[r] : starts[r] + lengths[r]]``; ``-inf`` marks an invisible
    entry). The block reduces the row max and the visible count, then runs
    ``n_iter`` bisection steps on ``f(m) = sum [x - m]_+ ** beta - 1`` over the
    reference's bracket, each step one block reduction. For alpha = 2 and
    1.5 with ``use_sort`` it then *polishes* ``tau`` in closed form on the
    found support ``S = {x > lo}``: ``tau = (sum_S x - 1) / |S|``, or
    ``mu_S - sqrt(max(0, 1/|S| - (m_S - mu_S**2)))``, which is the sort
    result whenever the support matches. Finally the row is overwritten by
    ``p``. Arithmetic is float64 inside the kernel whatever the value dtype.

Attention
    Query blocks of ``Bq`` rows with ``G Bq Nk * itemsize <= 256 MiB``: a
    batched product gives the scores (causal: keys up to the block's last
    position), invisible entries become ``-inf``, the row kernel turns the
    tile into ``P`` in place, and a second product gives ``P v``. The
    backward rebuilds ``P`` per block from the saved row max, threshold and
    normaliser and applies the reference's pullback with ``xp = cupy``.
    alpha = 1 is the ``exact`` method's blocked softmax.

Runs on CuPy arrays on a GPU and on NumPy arrays under the CUDA simulator
(``eff_attn._backend.emulate_cupy``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64

from ._cuda import launch_rows, simulated, to_xp, xp_of
from ._cuda_device import MAX_THREADS, block_reduce
from ._softmax_cupy import blocked_backward, blocked_forward
from ._tile_sizes import GPU_TILE_BYTES
from .masks import visible_counts, visible_pairs
from ._entmax import entmax_attention_backward, entmax_probabilities, entmax_rows_alpha_grad, entmax_rows_vjp

__all__ = ["row_threshold_kernel", "run_row_threshold", "rows_forward", "rows_backward", "rows_alpha_grad",
           "forward", "backward"]

#: Threads per row under the CUDA simulator: each of the n_iter block reductions
#: costs a Python barrier per thread there, and 2 threads still exercise them.
SIMULATOR_THREADS = 2


@cuda.jit(device=True)
def _power(d, alpha, beta):
    if alpha == 2.0:
        return d
    if alpha == 1.5:
        return d * d
    return math.pow(d, beta)


@cuda.jit
def row_threshold_kernel(vals, starts, lengths, alpha, rows_per_alpha, use_sort, n_iter, ensure_sum_one,
                         z_max_out, tau_shifted_out, tau_out, norm_out, support_out):
    """alpha-entmax of each row of ``vals`` in place (one block per row); see the module docstring.

    Writes per row the max ``z_max``, the threshold in shifted units
    (``p = [(alpha-1)(z - z_max) - tau_shifted]_+ ** beta / norm``; at alpha = 1
    ``p = exp(z - z_max - tau_shifted)``), the unshifted ``tau``, ``norm`` and
    the support size. Rows with nothing visible become 0 with ``tau = +inf``.
    """
    buf = cuda.shared.array(MAX_THREADS, float64)
    row = cuda.blockIdx.x
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    s0 = starts[row]
    length = lengths[row]
    a = alpha[row // rows_per_alpha]
    local_max = -math.inf
    local_n = 0.0
    for c in range(tid, length, nt):
        z = float64(vals[s0 + c])
        if z > -math.inf:
            local_max = max(local_max, z)
            local_n += 1.0
    z_max = block_reduce(buf, local_max, True)
    n_vis = block_reduce(buf, local_n, False)
    if n_vis == 0.0:
        for c in range(tid, length, nt):
            vals[s0 + c] = 0
        if tid == 0:
            z_max_out[row] = 0.0
            tau_shifted_out[row] = math.inf
            tau_out[row] = math.inf
            norm_out[row] = 1.0
            support_out[row] = 0
        return
    if a == 1.0:                                                           # softmax row
        local = 0.0
        for c in range(tid, length, nt):
            z = float64(vals[s0 + c])
            e = math.exp(z - z_max) if z > -math.inf else 0.0
            vals[s0 + c] = e
            local += e
        total = block_reduce(buf, local, False)
        for c in range(tid, length, nt):
            vals[s0 + c] = vals[s0 + c] / total
        if tid == 0:
            z_max_out[row] = z_max
            tau_shifted_out[row] = math.log(total)
            tau_out[row] = z_max + math.log(total)
            norm_out[row] = 1.0
            support_out[row] = int(n_vis)
        return
    a1 = a - 1.0
    beta = 1.0 / a1
    lo = -1.0
    hi = -math.pow(n_vis, 1.0 - a)
    for _ in range(n_iter):                                                # invariant: f(lo) >= 0 > f(hi)
        m = 0.5 * (lo + hi)
        local = 0.0
        for c in range(tid, length, nt):
            d = a1 * (float64(vals[s0 + c]) - z_max) - m
            if d > 0:
                local += _power(d, a, beta)
        if block_reduce(buf, local, False) >= 1.0:
            lo = m
        else:
            hi = m
    tau = lo
    if use_sort:                                                           # closed form on S = {x > lo}
        s1 = 0.0
        s2 = 0.0
        cnt = 0.0
        for c in range(tid, length, nt):
            x = a1 * (float64(vals[s0 + c]) - z_max)
            if x > lo:
                s1 += x
                s2 += x * x
                cnt += 1.0
        s1 = block_reduce(buf, s1, False)
        s2 = block_reduce(buf, s2, False)
        cnt = block_reduce(buf, cnt, False)
        if a == 2.0:
            tau = (s1 - 1.0) / cnt
        else:
            mu = s1 / cnt
            tau = mu - math.sqrt(max(0.0, 1.0 / cnt - (s2 / cnt - mu * mu)))
    local = 0.0
    local_support = 0.0
    for c in range(tid, length, nt):
        d = a1 * (float64(vals[s0 + c]) - z_max) - tau
        w = _power(d, a, beta) if d > 0 else 0.0
        vals[s0 + c] = w
        local += w
        local_support += 1.0 if d > 0 else 0.0
    total = block_reduce(buf, local, False)
    support = block_reduce(buf, local_support, False)
    norm = total if (ensure_sum_one and not use_sort and total > 0) else 1.0
    if norm != 1.0:
        for c in range(tid, length, nt):
            vals[s0 + c] = vals[s0 + c] / norm
    if tid == 0:
        z_max_out[row] = z_max
        tau_shifted_out[row] = tau
        tau_out[row] = tau + a1 * z_max
        norm_out[row] = norm
        support_out[row] = int(support)


def run_row_threshold(xp, vals, starts, lengths, alpha, rows_per_alpha, *, use_sort, n_iter, ensure_sum_one):
    """Launch :func:`row_threshold_kernel` on the flat ``vals``; returns the per-row outputs.

    Returns
    -------
    dict with ``z_max``, ``tau_shifted``, ``tau``, ``norm`` (float64) and
    ``support`` (int64), each of shape (R,).
    """
    R = int(starts.shape[0])
    out = {name: xp.empty(R, dtype=np.float64) for name in ("z_max", "tau_shifted", "tau", "norm")}
    out["support"] = xp.empty(R, dtype=np.int64)
    launch_rows(row_threshold_kernel, R, vals, starts, lengths, alpha, rows_per_alpha, use_sort, n_iter,
                ensure_sum_one, out["z_max"], out["tau_shifted"], out["tau"], out["norm"], out["support"],
                threads=SIMULATOR_THREADS if simulated() else None)
    return out


def _alpha_rows(xp, alpha, R):
    return to_xp(xp, np.ascontiguousarray(np.broadcast_to(np.asarray(alpha, dtype=np.float64), (R,))))


def _dense_rows(xp, R, n):
    return xp.arange(R, dtype=np.int64) * n, xp.full(R, n, dtype=np.int64)


# --- transforms ---------------------------------------------------------------------


def rows_forward(z, mask, alpha, *, algorithm, n_iter, ensure_sum_one):
    """Transform entry point over rows ``z (R, n)``."""
    xp = xp_of(z)
    R, n = z.shape
    vals = z.copy() if mask is None else xp.where(mask, z, -xp.inf).astype(z.dtype)   # (R, n)
    alphas = _alpha_rows(xp, 1.0 if algorithm == "softmax" else alpha, R)
    starts, lengths = _dense_rows(xp, R, n)
    rows = run_row_threshold(xp, vals.reshape(-1), starts, lengths, alphas, 1, use_sort=algorithm == "sort",
                             n_iter=n_iter, ensure_sum_one=ensure_sum_one)
    return vals, rows["tau"].astype(z.dtype), rows["support"]


def _alpha_xp(p, alpha):
    return alpha if np.ndim(alpha) == 0 else to_xp(xp_of(p), alpha)


def rows_backward(p, g, alpha):
    """Transform pullback, the reference's formula on ``xp``."""
    return entmax_rows_vjp(p, g, _alpha_xp(p, alpha), xp_of(p))


def rows_alpha_grad(p, g, alpha):
    """Per-row derivative with respect to alpha, shape (R,)."""
    return entmax_rows_alpha_grad(p, g, _alpha_xp(p, alpha), xp_of(p))


# --- attention ----------------------------------------------------------------------


def query_block(G: int, Nk: int, itemsize: int) -> int:
    """Largest ``Bq`` with ``G Bq Nk * itemsize <= 256 MiB`` (at least 1)."""
    return max(1, GPU_TILE_BYTES // max(1, G * Nk * itemsize))


def _blocks(G, Nq, Nk, itemsize, offset):
    """``(i0, i1, k_end)`` per query block; keys ``>= k_end`` are invisible to the whole block."""
    Bq = query_block(G, Nk, itemsize)
    for i0 in range(0, Nq, Bq):
        i1 = min(Nq, i0 + Bq)
        yield i0, i1, (Nk if offset is None else min(Nk, max(0, i1 + offset)))


def _block_visibility(xp, mask, offset, i0, i1, k_end):
    keep = None if mask is None else mask[:, :k_end]
    return visible_pairs(keep, None if offset is None else offset + i0, i1 - i0, k_end, xp)   # (G|1, Bq, k_end)


def forward(q, k, v, *, mask, offset, scale, alpha, algorithm, n_iter):
    """Query-blocked entmax forward; see the module docstring."""
    xp = xp_of(q)
    G, Nq, _ = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    if algorithm == "softmax":
        out, res = blocked_forward(q, k, v, mask=mask, offset=offset, scale=scale)
        support = xp.ascontiguousarray(xp.broadcast_to(visible_counts(mask, offset, Nq, Nk, xp), (G, Nq)))
        tau = xp.where(support > 0, res["lse"], xp.inf).astype(q.dtype)
        return out, {"tau": tau, "support_size": support, "lse": res["lse"]}
    alphas = _alpha_rows(xp, alpha, G)
    qs = q * q.dtype.type(scale)                                             # (G, Nq, D)
    kT = xp.swapaxes(k, -1, -2)                                              # (G, D, Nk)
    out = xp.empty((G, Nq, Dv), dtype=q.dtype)
    saved = {name: xp.empty((G, Nq), dtype=np.float64) for name in ("z_max", "tau_shifted", "tau", "norm")}
    saved["support"] = xp.empty((G, Nq), dtype=np.int64)
    for i0, i1, k_end in _blocks(G, Nq, Nk, q.dtype.itemsize, offset):
        bq = i1 - i0
        s = xp.matmul(qs[:, i0:i1], kT[:, :, :k_end])                       # (G, Bq, k_end)
        s = xp.ascontiguousarray(xp.where(_block_visibility(xp, mask, offset, i0, i1, k_end), s, -xp.inf))
        starts, lengths = _dense_rows(xp, G * bq, k_end)
        rows = run_row_threshold(xp, s.reshape(-1), starts, lengths, alphas, bq, use_sort=algorithm == "sort",
                                 n_iter=n_iter, ensure_sum_one=True)
        for name, arr in rows.items():
            saved[name][:, i0:i1] = arr.reshape(G, bq)
        out[:, i0:i1] = xp.matmul(s, v[:, :k_end])                           # (G, Bq, Dv)
    return out, {"tau": saved["tau"].astype(q.dtype), "support_size": saved["support"], **saved}


def backward(dout, q, k, v, out, res, *, mask, offset, scale, alpha, algorithm, **params):
    """Per query block: rebuild ``P``, then the reference's pullback on ``xp``."""
    if algorithm == "softmax":
        return blocked_backward(dout, q, k, v, out, {"lse": res["lse"]}, mask=mask, offset=offset, scale=scale)
    xp = xp_of(q)
    G, Nq, _ = q.shape
    Nk = k.shape[1]
    alpha_rows = alpha if np.ndim(alpha) == 0 else np.asarray(alpha)[:, None]   # float or (G, 1), host
    dq = xp.zeros_like(q)
    dk = xp.zeros_like(k)
    dv = xp.zeros_like(v)
    for i0, i1, k_end in _blocks(G, Nq, Nk, q.dtype.itemsize, offset):
        s = scale * xp.matmul(q[:, i0:i1], xp.swapaxes(k[:, :k_end], -1, -2))   # (G, Bq, k_end)
        visible = _block_visibility(xp, mask, offset, i0, i1, k_end)             # (G|1, Bq, k_end)
        P = entmax_probabilities(s, visible, alpha_rows, res["z_max"][:, i0:i1], res["tau_shifted"][:, i0:i1],
                                 res["norm"][:, i0:i1], xp).astype(q.dtype)      # (G, Bq, k_end)
        dq_b, dk_b, dv_b = entmax_attention_backward(dout[:, i0:i1], q[:, i0:i1], k[:, :k_end], v[:, :k_end], P,
                                                     scale=scale, alpha=alpha, xp=xp)
        dq[:, i0:i1] = dq_b
        dk[:, :k_end] += dk_b
        dv[:, :k_end] += dv_b
    return dq, dk, dv
