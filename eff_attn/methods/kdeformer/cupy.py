"""KDEformer on the GPU: batched cuBLAS products over sorted blocks and a gather of the samples.

Runs the reference's array program
(:func:`eff_attn.methods.kdeformer.reference.kdeformer_reference`) with
``xp = cupy``, which is already the GPU program:

1. **Hash and sort.** Codes from a batched float64 product (TF32 never
   applies to float64), in groups of slices whose float64 copy stays within
   :data:`TILE_BYTES`; then ``argsort`` on the unique int64 keys
   ``key * N + index``, so the unstable GPU sort gives the stable order.
2. **Work table.** Built on the host from the G kept counts: items
   (slice, chunk of ``c_q`` sorted queries, key block), one per block
   without a mask and at most ``2 G ceil(Nk / b)`` with one.
3. **Blocks.** Per group of items: gather padded (W, c_q, D), (W, b, D) and
   (W, b, Dv+1) arrays, one batched product, max/exp, one batched product,
   and a scatter to the rows (each row is written once: no atomics).
4. **Samples.** The probabilities are array operations (``"official"``
   moves the (Dv+1)^2 Gram matrices to the host for ``eigvalsh``). The
   inverse-CDF draw is two numba.cuda kernels: :func:`_prefix_sum_rows`
   (one thread per slice, the float64 sums in NumPy's sequential order, so
   the draws match the host backends bit for bit) and :func:`_search_rows`
   (one thread per sample, a binary search). Then per group of queries: a
   gather of ``K_J`` and ``[V_J, 1]``, a (G, Nq', m) product, the
   own-block exclusion, shift, exp and weight, and one more product.

Memory ``O(G (Nq + Nk)(D + Dv))`` plus tiles of at most :data:`TILE_BYTES`.
Forward only.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..._cuda import threads_per_block, to_xp, xp_of
from ..._tile_sizes import GPU_TILE_BYTES
from .reference import kdeformer_reference

__all__ = ["forward", "inverse_cdf_sample_cuda", "TILE_BYTES"]

#: Byte budget of one step's largest temporary (items, queries or slices per step).
TILE_BYTES = GPU_TILE_BYTES


@cuda.jit
def _prefix_sum_rows(pi, C):
    """``C[g] = cumsum(pi[g])``, one thread per slice, added left to right like NumPy."""
    g = cuda.grid(1)
    if g < pi.shape[0]:
        total = 0.0
        for j in range(pi.shape[1]):
            total += pi[g, j]
            C[g, j] = total


@cuda.jit
def _search_rows(C, u, out):
    """``out[g, l] = #{j : C[g, j] <= u[g, l] C[g, -1]}`` by binary search; -1 if ``C[g, -1] = 0``."""
    t = cuda.grid(1)
    G, m = u.shape
    if t < G * m:
        g, ell = t // m, t % m
        N = C.shape[1]
        total = C[g, N - 1]
        if total <= 0:
            out[g, ell] = -1
            return
        x = u[g, ell] * total
        lo, hi = 0, N                       # invariant: C[lo-1] <= x < C[hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if C[g, mid] <= x:
                lo = mid + 1
            else:
                hi = mid
        out[g, ell] = lo


def _launch(kernel, n, *args):
    if n == 0:
        return
    threads = threads_per_block()
    kernel[(n + threads - 1) // threads, threads](*args)


def inverse_cdf_sample_cuda(pi, u):
    """:func:`eff_attn.methods.kdeformer.inverse_cdf_sample` with numba.cuda kernels, (G, m) int64."""
    xp = xp_of(pi)
    pi, u = xp.ascontiguousarray(pi), xp.ascontiguousarray(u)
    C = xp.empty_like(pi)                                                    # (G, Nk)
    out = xp.empty(u.shape, dtype=np.int64)                                  # (G, m)
    _launch(_prefix_sum_rows, pi.shape[0], pi, C)
    _launch(_search_rows, u.size, C, u, out)
    return out


def _per_step(total, bytes_per_unit):
    """How many units (items, queries, slices) fit one step of :data:`TILE_BYTES`."""
    return max(1, min(total, TILE_BYTES // max(1, bytes_per_unit)))


def forward(q, k, v, *, mask, offset, scale, num_bits, block_size, num_samples, order, probs, hyperplanes=None,
            q_codes=None, k_codes=None, sample_idx=None, uniforms=None):
    """Move the host draws to the device and run the chunked array program; see the module docstring."""
    xp = xp_of(q)
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    size = q.dtype.itemsize
    b = min(block_size, Nk)
    c_q = -(-Nq // -(-Nk // block_size))
    item_bytes = size * (c_q * D + b * (D + Dv + 1) + 2 * c_q * b + c_q * (Dv + 1)) + 8 * (c_q + b)
    query_bytes = G * (size * (3 * max(num_samples, 1) + Dv + 1) + max(num_samples, 1))
    slice_bytes = 8 * (Nq + Nk) * (D + 1 + num_bits)
    return kdeformer_reference(
        q, k, v, mask=mask, scale=scale, num_bits=num_bits, num_samples=num_samples, block_size=block_size,
        order=order, probs=probs, hyperplanes=to_xp(xp, hyperplanes), q_codes=to_xp(xp, q_codes),
        k_codes=to_xp(xp, k_codes), sample_idx=to_xp(xp, sample_idx), uniforms=to_xp(xp, uniforms), xp=xp,
        sampler=inverse_cdf_sample_cuda, item_chunk=_per_step(2 * G * -(-Nk // block_size), item_bytes),
        query_chunk=_per_step(Nq, query_bytes), slice_chunk=_per_step(G, slice_bytes),
    )
