"""Shared Numba settings for every ``numba.py`` backend module.

Imported only by the Numba backends, never by ``import eff_attn``.

- :data:`FASTMATH` is the safe fast-math set: reassociation, contraction and
  approximate functions, but never ``nnan``/``ninf``, which would let LLVM
  assume away the ``-inf`` of masked scores.
- :func:`kernel` is ``njit(parallel=True, cache=True, error_model="numpy")``
  with that set; :func:`serial` the same without ``parallel``.
- :func:`blas_single_thread` holds BLAS to one thread while ``prange`` owns
  the cores, so the tiles' ``np.dot`` calls do not oversubscribe them.
- :func:`exp_shifted` is the hot loop of every softmax: ``row <- exp(row - shift)``
  and its sum. Without Intel's SVML, LLVM calls the scalar ``expf`` once per
  element; the float32 version here is a branch-free Cody-Waite reduction and
  a degree-7 polynomial that LLVM vectorises (about 17x faster on AVX-512,
  relative error below 3e-7, exactly 0 for ``-inf``). float64 uses ``np.exp``.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
from numba import types
from numba.extending import overload

__all__ = ["FASTMATH", "kernel", "serial", "blas_single_thread", "contiguous", "exp_shifted", "row_maximum"]

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


def kernel(fn):
    """Compile ``fn`` as a parallel, cached kernel with the safe fast-math set."""
    return numba.njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")(fn)


def serial(fn):
    """Compile ``fn`` as a serial, cached helper with the safe fast-math set."""
    return numba.njit(cache=True, fastmath=FASTMATH, error_model="numpy")(fn)


_controller = None


@contextlib.contextmanager
def blas_single_thread():
    """Limit BLAS to one thread inside the block (threadpoolctl)."""
    global _controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # threadpoolctl is part of the numba extra; run unlimited without it
        yield
        return
    if _controller is None:
        # Numba's np.dot calls SciPy's BLAS. Kernels loaded from the on-disk cache have
        # not loaded it yet, and a controller only sees libraries loaded before it.
        import scipy.linalg.cython_blas  # noqa: F401

        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield


def contiguous(*arrays):
    """C-contiguous views (copies only where needed), so one specialisation per dtype compiles."""
    return tuple(None if a is None else np.ascontiguousarray(a) for a in arrays)


_LANES = 16


@serial
def row_maximum(row):
    """``max(row)`` (``-inf`` for an all ``-inf`` row), in 16 independent lanes.

    A plain running max is a serial chain LLVM may not vectorise without
    ``nnan``; 16 lanes of element-wise maxima vectorise, then fold.
    """
    n = row.shape[0]
    lanes = np.empty(_LANES, dtype=row.dtype)
    lanes[:] = -np.inf
    full = n - n % _LANES
    for c0 in range(0, full, _LANES):
        for lane in range(_LANES):
            x = row[c0 + lane]
            lanes[lane] = x if x > lanes[lane] else lanes[lane]
    best = lanes[0]
    for lane in range(1, _LANES):
        best = lanes[lane] if lanes[lane] > best else best
    for c in range(full, n):
        best = row[c] if row[c] > best else best
    return best


def exp_shifted(row, shift, bits):
    """In place ``row <- exp(row - shift)``; returns ``sum(row)``.

    ``bits`` is an int32 scratch array at least as long as ``row`` (float32
    only). Callable from Numba-compiled code only.
    """
    raise TypeError("exp_shifted is only callable from Numba-compiled code")


# Cody-Waite split of ln 2 and the minimax coefficients of exp on [-ln2/2, ln2/2].
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_LOG2E = np.float32(1.4426950408889634)
_C = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                     4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))


@overload(exp_shifted, jit_options={"fastmath": FASTMATH})
def _exp_shifted_impl(row, shift, bits):
    if row.dtype == types.float32:
        c0, c1, c2, c3, c4, c5 = _C

        def impl32(row, shift, bits):
            scale = bits.view(np.float32)
            for c in range(row.shape[0]):
                x = max(row[c] - shift, np.float32(-88.0))             # exp(-88) < 2**-126: flushes to 0
                m = np.floor(x * _LOG2E + np.float32(0.5))             # x = m ln2 + r, |r| <= ln2 / 2
                r = x - m * _LN2_HI
                r = r - m * _LN2_LO
                p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
                row[c] = p * r * r + r + np.float32(1.0)               # exp(r)
                bits[c] = (np.int32(m) + np.int32(127)) << 23          # 2**m as float32 bits (0 for m = -127)
            total = np.float32(0.0)
            for c in range(row.shape[0]):
                y = row[c] * scale[c]
                row[c] = y
                total += y
            return total

        return impl32

    def impl64(row, shift, bits):
        total = 0.0
        for c in range(row.shape[0]):
            y = np.exp(row[c] - shift)
            row[c] = y
            total += y
        return total

    return impl64
