"""numba.cuda device functions shared by the CuPy backends' softmax kernels.

Imported only by the ``cupy.py`` backend modules (it imports ``numba.cuda``,
which :mod:`eff_attn._cuda` does not). Non-finite scores follow the NumPy
reference (:func:`eff_attn._softmax.masked_softmax`) and the Numba step
(:mod:`eff_attn._tiles`):

- a NaN score makes its row NaN, never 0: :func:`nan_max` propagates NaN
  (CUDA's ``max`` is ``fmax``, which drops it, and under the simulator
  Python's ``max`` drops it or not by argument order);
- a ``+inf`` score is the limit of a growing score: :func:`exp_shift` reads
  ``exp(inf - inf)`` as 1, so a row whose max is ``+inf`` puts its weight on
  its ``+inf`` keys;
- a ``-inf`` score (masked, or scored ``-inf``) has weight 0 whatever the
  shift, so a row with nothing visible stays 0.
"""

from __future__ import annotations

import math

from numba import cuda

__all__ = ["MAX_THREADS", "nan_max", "exp_shift", "block_reduce"]

#: Shared-memory slots for the per-row block reductions (the largest block size used).
MAX_THREADS = 128


@cuda.jit(device=True)
def nan_max(a, b):
    """``max(a, b)``, NaN if either is NaN (written out: no ``max``/``fmax``)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


@cuda.jit(device=True)
def exp_shift(s, mu):
    """``exp(s - mu)`` with ``exp(-inf - mu) := 0`` for every ``mu`` and ``exp(s - s) := 1`` (``inf - inf`` included).

    NaN in ``s`` or ``mu`` (other than ``s = -inf``) gives NaN.
    """
    if s == -math.inf:
        return 0.0
    if s == mu:
        return 1.0
    return math.exp(s - mu)


@cuda.jit(device=True)
def block_reduce(buf, value, is_max):
    """Max (NaN-propagating, :func:`nan_max`) or sum of ``value`` over the thread block, via shared ``buf``."""
    tid = cuda.threadIdx.x
    buf[tid] = value
    cuda.syncthreads()
    width = cuda.blockDim.x // 2
    while width > 0:
        if tid < width:
            if is_max:
                buf[tid] = nan_max(buf[tid], buf[tid + width])
            else:
                buf[tid] += buf[tid + width]
        cuda.syncthreads()
        width //= 2
    result = buf[0]
    cuda.syncthreads()
    return result
