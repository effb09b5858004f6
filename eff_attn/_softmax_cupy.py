"""The blocked online softmax on the GPU: cuBLAS tiles plus one fused softmax kernel.

The GPU code of exact attention (and of entmax with alpha = 1). Matches
:func:`eff_attn.methods.exact.reference.exact_blocked`, with all
queries of all slices in one tile row.

Blocking
    Loop over key blocks of ``Bk`` keys (causal: over query chunks of ``Bk``
    rows too, skipping key blocks wholly in their future). Per block:

    1. ``S = (s q) k_J^T``, one batched cuBLAS product, (G, Nq, Bk);
    2. ``_online_softmax_tile`` (numba.cuda, one thread block per row):
       applies the mask and the causal limit, takes the row max, rescales
       with the running max, exponentiates ``S`` in place and sums it, and
       updates the running ``mu`` and ``l``; it writes the rescale factor
       ``alpha`` per row;
    3. ``acc <- alpha acc + P v_J``, one more batched product.

    Memory ``O(G Nq (Bk + Dv))``: ``Bk`` is chosen so the tile stays under
    256 MiB, so memory never grows as Nq x Nk. TF32 stays off (CuPy's
    default), so float32 products are IEEE float32.

Backward
    The same key-block loop from the saved logsumexp: per block, ``P`` is
    recomputed in place by ``_probability_tile``, then ``dv_J``, ``dk_J`` and
    the ``dq`` accumulation are batched products.

The kernels run on CuPy arrays on a GPU and on NumPy arrays under the CUDA
simulator (``eff_attn._backend.emulate_cupy``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64

from ._cuda import launch_rows, xp_of
from ._cuda_device import MAX_THREADS, block_reduce, exp_shift, nan_max
from ._tile_sizes import gpu_block_k
from .masks import as_cuda_mask

__all__ = ["blocked_forward", "blocked_backward"]

@cuda.jit(device=True)
def _visible(keep, g, i, j, has_mask, causal, offset):
    if causal and j > i + offset:
        return False
    return (not has_mask) or keep[g, j]


@cuda.jit
def _online_softmax_tile(s, keep, has_mask, causal, offset, j0, mu, ell, alpha):
    """One online-softmax step on the tile ``s`` (G, Bq, Bk), in place.

    Block ``b`` owns row ``(g, i) = divmod(b, Bq)``. Afterwards
    ``s[g, i, c] = exp(S - mu_new)`` (0 if invisible), ``alpha = exp(mu_old - mu_new)``,
    ``l <- alpha l + sum_c s``, ``mu <- mu_new``. A row with nothing visible yet
    keeps ``mu = -inf``, gets ``s = 0`` and ``alpha = 1``. Non-finite scores as
    :mod:`eff_attn._cuda_device`: a NaN score makes ``mu``, ``l`` and the row NaN;
    a ``+inf`` max gives weight 1 to each ``+inf`` key and 0 to the others.
    """
    buf = cuda.shared.array(MAX_THREADS, float64)
    _, Bq, Bk = s.shape
    g = cuda.blockIdx.x // Bq
    i = cuda.blockIdx.x % Bq
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    local = -math.inf
    for c in range(tid, Bk, nt):
        if _visible(keep, g, i, j0 + c, has_mask, causal, offset):
            local = nan_max(local, s[g, i, c])
        else:
            s[g, i, c] = -math.inf
    row_max = block_reduce(buf, local, True)
    mu_old = mu[g, i]
    mu_new = nan_max(mu_old, row_max)
    if mu_new == -math.inf:
        for c in range(tid, Bk, nt):
            s[g, i, c] = 0
        if tid == 0:
            alpha[g, i] = 1
        return
    local = 0.0
    for c in range(tid, Bk, nt):
        p = exp_shift(s[g, i, c], mu_new)
        s[g, i, c] = p
        local += p
    total = block_reduce(buf, local, False)
    if tid == 0:
        a = exp_shift(mu_old, mu_new)
        alpha[g, i] = a
        ell[g, i] = a * ell[g, i] + total
        mu[g, i] = mu_new


@cuda.jit
def _probability_tile(s, lse, keep, has_mask, causal, offset, j0):
    """In place ``s <- exp(s - L_i)`` on visible entries, 0 elsewhere (one block per row)."""
    _, Bq, Bk = s.shape
    g = cuda.blockIdx.x // Bq
    i = cuda.blockIdx.x % Bq
    L = lse[g, i]
    for c in range(cuda.threadIdx.x, Bk, cuda.blockDim.x):
        if L != -math.inf and _visible(keep, g, i, j0 + c, has_mask, causal, offset):
            s[g, i, c] = math.exp(s[g, i, c] - L)
        else:
            s[g, i, c] = 0


def _safe_log(xp, x):
    return xp.where(x > 0, xp.log(xp.where(x > 0, x, 1)), -xp.inf)


def blocked_forward(q, k, v, *, mask, offset, scale, algorithm="blocked", block_q=None, block_k=None):
    """Blocked online-softmax forward over every visible key (exact attention); see the module docstring.

    The signature is exact attention's backend entry point: ``algorithm`` is "blocked"
    whenever this runs (the registry refuses "naive" outside NumPy)."""
    xp = xp_of(q)
    G, Nq, _ = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    Bk = block_k or gpu_block_k(G, Nq, q.dtype.itemsize)
    causal = offset is not None
    keep, has_mask = as_cuda_mask(xp, mask)
    qs = q * q.dtype.type(scale)                                             # (G, Nq, D)
    kT = xp.swapaxes(k, -1, -2)                                              # (G, D, Nk)
    out = xp.empty((G, Nq, Dv), dtype=q.dtype)
    lse = xp.empty((G, Nq), dtype=q.dtype)
    chunk = block_q or (Bk if causal else Nq)
    for i0 in range(0, Nq, chunk):
        i1 = min(Nq, i0 + chunk)
        mu = xp.full((G, i1 - i0), -xp.inf, dtype=q.dtype)                   # (G, Bq)
        ell = xp.zeros((G, i1 - i0), dtype=q.dtype)                          # (G, Bq)
        alpha = xp.empty((G, i1 - i0), dtype=q.dtype)                        # (G, Bq)
        acc = xp.zeros((G, i1 - i0, Dv), dtype=q.dtype)                      # (G, Bq, Dv)
        k_end = Nk if not causal else min(Nk, max(0, i1 + offset))
        for j0 in range(0, k_end, Bk):
            j1 = min(k_end, j0 + Bk)
            s = xp.matmul(qs[:, i0:i1], kT[:, :, j0:j1])                     # (G, Bq, Bk)
            launch_rows(_online_softmax_tile, G * (i1 - i0), s, keep, has_mask, causal,
                        0 if offset is None else offset + i0, j0, mu, ell, alpha)
            acc *= alpha[..., None]                                          # (G, Bq, Dv)
            acc += xp.matmul(s, v[:, j0:j1])                                 # (G, Bq, Dv)
        out[:, i0:i1] = acc / xp.where(ell > 0, ell, 1)[..., None]
        lse[:, i0:i1] = mu + _safe_log(xp, ell)
    return out, {"lse": lse, "algorithm": "blocked", "block_q": chunk, "block_k": Bk}


def blocked_backward(dout, q, k, v, out, res, *, mask, offset, scale, block_q=None, block_k=None, **params):
    """Key-block loop backward from the saved logsumexp ``res["lse"]``."""
    xp = xp_of(q)
    G, Nq, _ = q.shape
    Nk = k.shape[1]
    Bk = block_k or gpu_block_k(G, Nq, q.dtype.itemsize)
    causal = offset is not None
    keep, has_mask = as_cuda_mask(xp, mask)
    s_ = q.dtype.type(scale)
    qs = q * s_                                                              # (G, Nq, D)
    delta = (dout * out).sum(axis=-1)                                        # (G, Nq)
    lse = res["lse"]
    dq = xp.zeros_like(q)
    dk = xp.zeros_like(k)
    dv = xp.zeros_like(v)
    for j0 in range(0, Nk, Bk):
        j1 = min(Nk, j0 + Bk)
        i0 = 0 if not causal else min(Nq, max(0, j0 - offset))               # earlier queries see none of J
        if i0 == Nq:
            break
        p = xp.matmul(qs[:, i0:], xp.swapaxes(k[:, j0:j1], -1, -2))          # (G, Nq', Bk) scores
        launch_rows(_probability_tile, G * (Nq - i0), p, lse[:, i0:], keep, has_mask, causal,
                    0 if offset is None else offset + i0, j0)                 # (G, Nq', Bk) P
        do = dout[:, i0:]                                                    # (G, Nq', Dv)
        dv[:, j0:j1] = xp.matmul(xp.swapaxes(p, -1, -2), do)                 # (G, Bk, Dv)
        ds = xp.matmul(do, xp.swapaxes(v[:, j0:j1], -1, -2))                 # (G, Nq', Bk) dP
        ds -= delta[:, i0:, None]
        ds *= p                                                              # (G, Nq', Bk) dS
        dk[:, j0:j1] = xp.matmul(xp.swapaxes(ds, -1, -2), qs[:, i0:])        # (G, Bk, D)
        dq[:, i0:] += xp.matmul(ds, k[:, j0:j1]) * s_                        # (G, Nq', D)
    return dq, dk, dv
