"""FAVOR+ on the GPU: cuBLAS for phases 1 and 3, a numba.cuda kernel for the scan.

Matches :func:`eff_attn.methods.performer.reference.performer_reference`,
which is written against an array namespace: phases 1 and 3 (features,
chunk states, outputs) and the backward run there with ``xp = cupy`` as
batched cuBLAS products and fused elementwise steps over all chunks at once.
The one sequential step, the scan over chunks (phase 2, and its reverse in
the backward), is ``_scan_kernel``: one thread per state entry
``(g, r, e)``, walking the chunks in order.

The feature matrix is drawn on the host (float64) and moved to the device
once per call. Memory ``O(G (Nq + Nk) m + G (N / C) m Dv)``, plus the
causal in-chunk products ``O(G N C)``.

The kernel runs on CuPy arrays on a GPU and on NumPy arrays under the CUDA
simulator (``eff_attn.testing.emulate_cupy``).
"""

from __future__ import annotations

from numba import cuda

from ..._cuda import launch_rows, threads_per_block, xp_of
from . import reference

__all__ = ["forward", "backward"]


@cuda.jit
def _scan_kernel(x, decay, gain, reverse, out):
    """Thread ``(g, r, e)``: ``out[g, c, r, e] = acc``, then ``acc <- decay_c acc + gain_c x[g, c, r, e]``.

    Chunks in order (or reversed); ``acc`` starts at 0. Matches
    :func:`eff_attn.methods.performer.reference.exclusive_scan`.
    """
    G, n_c, m, F = x.shape
    t = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if t >= G * m * F:
        return
    g = t // (m * F)
    r = (t // F) % m
    e = t % F
    acc = 0.0
    for step in range(n_c):
        c = n_c - 1 - step if reverse else step
        out[g, c, r, e] = acc
        acc = decay[g, c] * acc + gain[g, c] * x[g, c, r, e]


def device_scan(x, decay, gain, *, reverse=False, xp=None):
    """:func:`~eff_attn.methods.performer.reference.exclusive_scan` by ``_scan_kernel``."""
    xp = xp_of(x) if xp is None else xp
    out = xp.empty_like(x)
    G, _, m, F = x.shape
    threads = threads_per_block()
    launch_rows(_scan_kernel, -(-G * m * F // threads), xp.ascontiguousarray(x), decay, gain, reverse, out,
                threads=threads)
    return out


def forward(q, k, v, *, mask, offset, scale, **params):
    """The reference's phases on the device, with the scan kernel."""
    return reference.forward(q, k, v, mask=mask, offset=offset, scale=scale, xp=xp_of(q), scan=device_scan, **params)


def backward(dout, q, k, v, out, res, *, mask, offset, scale, **params):
    """The reference's backward on the device, with the scan kernel for the reverse scan."""
    return reference.backward(dout, q, k, v, out, res, mask=mask, offset=offset, scale=scale, xp=xp_of(q),
                              scan=device_scan, **params)
