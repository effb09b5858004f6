"""Shared helpers for the ``cupy.py`` backend modules.

The CuPy backends are written against an array namespace ``xp``: ``cupy`` on a
GPU, ``numpy`` when emulated (see :func:`eff_attn._backend.emulate_cupy`).
Custom kernels are ``numba.cuda`` kernels; they accept CuPy arrays on a GPU
and NumPy arrays under the CUDA simulator. Imported only by the CuPy
backends.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from .interop import array_module

__all__ = ["xp_of", "to_xp", "threads_per_block", "simulated", "launch_rows"]


def xp_of(x):
    """``cupy`` for CuPy arrays, ``numpy`` otherwise (emulation)."""
    return array_module(x)


def to_xp(xp, a, dtype=None):
    """Move a host-drawn NumPy array to ``xp``'s device (no-op under emulation)."""
    if a is None:
        return None
    out = xp.asarray(a)
    return out if dtype is None else out.astype(dtype, copy=False)


def simulated() -> bool:
    """True when numba.cuda runs under the CUDA simulator."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def threads_per_block(default: int = 128) -> int:
    """Threads per block: ``default`` on a GPU, 8 under the (slow) simulator."""
    return 8 if simulated() else default


def launch_rows(kernel, num_rows: int, *args, threads: int | None = None):
    """Launch ``kernel`` with one block per row and ``threads`` threads per block."""
    if num_rows == 0:
        return
    threads = threads_per_block() if threads is None else threads
    if not simulated():
        kernel[num_rows, threads](*args)
        return
    _serialise_simulator_shared_arrays()
    # The simulator moves host arrays whole: give it contiguous, writable
    # copies of views and read-only arrays, and write the copies back after.
    staged = [
        np.ascontiguousarray(a).copy()
        if isinstance(a, np.ndarray) and not (a.flags.c_contiguous and a.flags.writeable) else a
        for a in args
    ]
    kernel[num_rows, threads](*staged)
    for a, b in zip(args, staged):
        if a is not b and a.flags.writeable:
            np.copyto(a, b)


_shared_lock = threading.Lock()


def _serialise_simulator_shared_arrays():
    """Make the simulator's ``cuda.shared.array`` allocation atomic (once per process).

    The simulator runs a block's threads as Python threads and gives them one
    shared array per call site: the first thread to reach the line allocates
    it, the others look it up. The look-up and the allocation are not locked,
    so two threads that reach the line together can each allocate their own
    array, and the block no longer shares it (seen as rows left at zero when
    threads switch often). Here the look-up and allocation run under a lock;
    dynamic shared memory (``shape == 0``) is left to the simulator.
    """
    from numba.cuda.simulator import kernelapi

    if getattr(kernelapi.FakeCUDAShared.array, "serialised", False):
        return
    allocate = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:
            return allocate(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        site = (caller.f_code.co_filename, caller.f_lineno)                # one array per call site, as the simulator
        with _shared_lock:
            found = self._allocations.get(site)
            if found is None:
                if isinstance(dtype, kernelapi.types.Type):                    # a Numba type, as the simulator accepts
                    dtype = kernelapi.numpy_support.as_dtype(dtype)
                found = self._allocations[site] = np.empty(shape, dtype)
        return found

    array.serialised = True
    kernelapi.FakeCUDAShared.array = array
