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
  element; the float32 version here is a branch-free Cody-Waite reduction, a
  degree-7 polynomial (Estrin's scheme, a short dependency chain) and ``2**m`` assembled from its bit pattern, in one pass
  that LLVM vectorises (relative error below 3e-7 against float64 exp over
  [-87, 0]: 2.97e-7 at most on 4M points, ``tests/test_jit.py``; exactly 0 for ``-inf``). float64
  uses ``np.exp``, so float64 results stay exact.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from llvmlite import ir
from numba.extending import intrinsic, overload

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
        # Load the BLAS that Numba's np.dot calls (SciPy's) first: the controller
        # only sees the libraries loaded when it is created.
        import scipy.linalg.cython_blas  # noqa: F401

        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield


def contiguous(*arrays):
    """C-contiguous views (copies only where needed), so one specialisation per dtype compiles."""
    return tuple(None if a is None else np.ascontiguousarray(a) for a in arrays)


def _llvm_float_binary(name):
    """An intrinsic ``f(a, b)`` on two floats of one type that calls ``llvm.<name>``; LLVM vectorises it."""

    @intrinsic
    def binary(typingctx, a, b):
        if not (isinstance(a, types.Float) and a == b):
            return None

        def codegen(context, builder, signature, args):
            lty = context.get_value_type(signature.args[0])
            suffix = "f32" if signature.args[0] == types.float32 else "f64"
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lty, [lty, lty]), f"llvm.{name}.{suffix}")
            return builder.call(fn, args)

        return a(a, b), codegen

    return binary


#: IEEE 754-2019 maximum: NaN if either is NaN (as ``np.maximum``).
_maximum = _llvm_float_binary("maximum")
#: The larger / smaller of two floats, the non-NaN one if either is NaN.
_maxnum = _llvm_float_binary("maxnum")
_minnum = _llvm_float_binary("minnum")


@serial
def row_maximum(row):
    """``max(row)``: ``-inf`` for an all ``-inf`` row, NaN if any entry is NaN (as ``np.max``).

    A ``x > best`` select is a serial chain that LLVM does not vectorise
    without ``nnan``; the ``llvm.maximum`` intrinsic is a reduction that it
    does vectorise, NaN propagation included.
    """
    best = row.dtype.type(-np.inf)
    for c in range(row.shape[0]):
        best = _maximum(best, row[c])
    return best


def exp_shifted(row, shift, bits):
    """In place ``row <- exp(row - shift)``; returns ``sum(row)``.

    ``bits`` is an int32 array at least as long as ``row``; the float32 version
    no longer needs it as scratch (``2**m`` is now built by a bitcast in the same
    pass), and it stays in the signature so callers need not change. A NaN
    entry gives NaN (and a NaN sum). Callable from Numba-compiled code only.
    """
    raise TypeError("exp_shifted is only callable from Numba-compiled code")


# Cody-Waite split of ln 2 and the minimax coefficients of exp on [-ln2/2, ln2/2].
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_LOG2E = np.float32(1.4426950408889634)
_C = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                     4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits`` (an LLVM bitcast, which vectorises)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@overload(exp_shifted, jit_options={"fastmath": FASTMATH})
def _exp_shifted_impl(row, shift, bits):
    if row.dtype == types.float32:
        c0, c1, c2, c3, c4, c5 = _C

        def impl32(row, shift, bits):
            # One fused pass: reduce, evaluate, scale by 2**m through the bit pattern, sum.
            total = np.float32(0.0)
            for c in range(row.shape[0]):
                x = row[c] - shift
                x = np.float32(-88.0) if x < np.float32(-88.0) else x         # exp(-88) < 2**-126 flushes to 0; NaN stays
                m = np.floor(x * _LOG2E + np.float32(0.5))                     # x = m ln2 + r, |r| <= ln2 / 2
                r = x - m * _LN2_HI
                r = r - m * _LN2_LO
                r2 = r * r
                r4 = r2 * r2                                                   # Estrin: p(r) = c0 r^5 + ... + c5 in
                p = (c0 * r + c1) * r4 + ((c2 * r + c3) * r2 + (c4 * r + c5))  # three levels, not Horner's five
                m = _minnum(_maxnum(m, np.float32(-127.0)), np.float32(128.0))  # a defined int32, NaN too
                y = (p * r2 + (r + np.float32(1.0))) * _float32_from_bits((np.int32(m) + np.int32(127)) << 23)
                row[c] = y                                                     # exp(r) 2**m (0 for m = -127)
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
