"""Timing and memory measurement for one backend call.

- **Warm time**: the call is run once (compilation, caches, CuPy module
  loads), then ``repeats`` more times; the median and the interquartile
  range of those are reported. The first run minus the warm median is the
  compile (first-call) overhead.
- **One pass** (:func:`measure_call`, what ``eff-attn compare`` uses): the
  first call, then one warm call that is memory-tracked and whose result is
  kept for scoring, then timed warm calls only while they fit the time
  budget (at least one). A call that takes seconds is made three times, not
  six or seven.
- **GPU timing** uses CUDA events around each call.
- **Peak memory** on the CPU is the growth of the process's resident set:
  Linux lets a process reset its high-water mark (``/proc/self/clear_refs``),
  so ``VmHWM - VmRSS(before)`` is the peak of memory touched during the call,
  Numba and BLAS allocations included (tracemalloc sees only Python's). So
  that freed memory is returned rather than recycled unseen, for that call
  only glibc's heap is trimmed first and its mmap and trim thresholds set to
  128 KiB (blocks larger than that are mapped and unmapped, never cached).
  Every timed call runs with the thresholds a long-running process settles
  at (glibc raises them as it frees large blocks: mmap above 32 MiB, trim
  at twice that), so that timings do not pay a page fault per temporary:
  with the 128 KiB setting, a Treeformer fit of 24 heads took 60 % longer.
  Where that is unavailable, tracemalloc's peak is used. On the GPU it is the growth
  of the CuPy memory pool over the call (the pool keeps every block it
  handed out, so its size after the call is its high-water mark).
"""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

__all__ = ["Timing", "Measured", "time_call", "best_time", "peak_memory", "measure_call"]


@dataclass(frozen=True)
class Timing:
    first_s: float
    warm_median_s: float
    warm_q25_s: float
    warm_q75_s: float
    repeats: int

    @property
    def compile_s(self) -> float:
        """First-call overhead: first run minus the warm median (>= 0)."""
        return max(0.0, self.first_s - self.warm_median_s)


def _sync(device: str):
    if device == "gpu":
        import cupy

        cupy.cuda.runtime.deviceSynchronize()


def _timed(fn, device: str) -> float:
    if device == "gpu":
        import cupy

        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_time(fn, repeats: int = 3, *, device: str = "cpu") -> float:
    """Seconds of the fastest of ``repeats`` warm calls of ``fn()``, after one warm-up call.

    For scripts that tabulate one number per configuration; ``eff-attn compare``
    reports the median and spread instead (:func:`time_call`).
    """
    _timed(fn, device)
    return min(_timed(fn, device) for _ in range(repeats))


def time_call(fn, *, device: str = "cpu", repeats: int = 5, min_time_s: float = 0.0) -> Timing:
    """Time ``fn()``: one first call, then at least ``repeats`` warm calls.

    Warm calls continue until ``min_time_s`` of them have accumulated.
    """
    _sync(device)
    first = _timed(fn, device)
    warm = []
    while len(warm) < repeats or sum(warm) < min_time_s:
        warm.append(_timed(fn, device))
        if len(warm) >= 1000:
            break
    q25, median, q75 = np.percentile(warm, [25, 50, 75])
    return Timing(first, float(median), float(q25), float(q75), len(warm))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


_GLIBC = {"ready": False, "lib": None}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3                 # mallopt parameters (malloc.h)
#: (mmap, trim) thresholds in bytes: while memory is tracked, and for timed calls (glibc's dynamic maximum).
_TRACKING, _RUNNING = (128 * 2**10, 128 * 2**10), (32 * 2**20, 64 * 2**20)


def _glibc():
    """glibc, or None on other C libraries."""
    if not _GLIBC["ready"]:
        _GLIBC["ready"] = True
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _ = (lib.mallopt, lib.malloc_trim)                 # both must exist
            _GLIBC["lib"] = lib
        except (OSError, AttributeError):
            _GLIBC["lib"] = None
    return _GLIBC["lib"]


def _allocator(thresholds) -> bool:
    """Set glibc's mmap and trim thresholds; False where glibc is not there."""
    lib = _glibc()
    if lib is None:
        return False
    lib.mallopt(_M_MMAP_THRESHOLD, thresholds[0])
    lib.mallopt(_M_TRIM_THRESHOLD, thresholds[1])
    return True


def _tracked(fn, device: str) -> tuple[int, object]:
    """``(peak bytes, fn()'s result)`` of one call, which runs with the tracking allocator settings."""
    if device == "gpu":
        import cupy

        pool = cupy.get_default_memory_pool()
        _sync(device)
        pool.free_all_blocks()
        before = pool.total_bytes()
        value = fn()
        _sync(device)
        return int(pool.total_bytes() - before), value
    if _allocator(_TRACKING):
        _glibc().malloc_trim(0)
    try:
        rss_before = _status_kib("VmRSS")
        if rss_before is not None and _reset_high_water_mark():
            value = fn()
            hwm = _status_kib("VmHWM")
            if hwm is not None:
                return max(0, (hwm - rss_before) * 1024), value
        tracemalloc.start()
        try:
            value = fn()
            return int(tracemalloc.get_traced_memory()[1]), value
        finally:
            tracemalloc.stop()
    finally:
        _allocator(_RUNNING)


def peak_memory(fn, *, device: str = "cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs (see the module docstring).

    Leaves glibc with the timed calls' thresholds (fixed, no longer dynamic).
    """
    return _tracked(fn, device)[0]


@dataclass(frozen=True)
class Measured:
    """:func:`measure_call`'s answer: the timing, the peak memory and the first warm call's result."""

    timing: Timing
    peak_bytes: int
    result: object


def measure_call(fn, *, device: str = "cpu", repeats: int = 5, time_budget_s: float = 2.0) -> Measured:
    """Time, peak memory and result of ``fn()``, in as few calls as its cost allows.

    1. A first call: compilation and caches; its time is ``first_s``.
    2. One call with its peak memory tracked (:func:`peak_memory`) and its
       result kept, so the caller scores it rather than calling again. It is
       not timed: tracking changes the allocator's settings for that call.
    3. Timed warm calls until there are ``repeats`` samples, or as many as
       fit in ``time_budget_s`` at the first one's pace (at least one).

    A call slower than ``time_budget_s`` is thus made three times.
    """
    _sync(device)
    _allocator(_RUNNING)                                      # what every timed call sees
    first = _timed(fn, device)
    peak, result = _tracked(fn, device)
    warm = [_timed(fn, device)]
    wanted = max(1, min(repeats, int(time_budget_s / max(warm[0], 1e-6))))
    while len(warm) < wanted:
        warm.append(_timed(fn, device))
    q25, median, q75 = np.percentile(warm, [25, 50, 75])
    return Measured(Timing(first, float(median), float(q25), float(q75), len(warm)), peak, result)
