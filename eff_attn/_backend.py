"""Backend discovery without importing the backends.

``import eff_attn`` must not import Numba, CuPy, torch or JAX. Whether a
backend is installed is answered with :func:`importlib.util.find_spec`;
whether CuPy has a device is asked only when a CuPy array is passed or the
``cupy`` backend is requested explicitly.

The CuPy backend is written against an array namespace ``xp`` with its
custom kernels in ``numba.cuda``. :func:`emulate_cupy` runs that same code on
NumPy arrays, with the kernels under ``NUMBA_ENABLE_CUDASIM=1``, so it is
tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from functools import lru_cache

__all__ = ["available", "emulate_cupy", "emulating", "backend_report"]

_EMULATE = {"cupy": False}


def _installed(name: str) -> bool:
    return name in sys.modules or importlib.util.find_spec(name) is not None


@lru_cache(maxsize=None)
def _numba_status() -> tuple[bool, str]:
    missing = [name for name in ("numba", "scipy") if not _installed(name)]
    if missing:
        return False, f"{' and '.join(missing)} not installed (pip install 'eff_attn[numba]')"
    return True, "numba installed"


@lru_cache(maxsize=None)
def _cupy_status() -> tuple[bool, str]:
    if not _installed("cupy"):
        return False, "cupy not installed (pip install 'eff_attn[cuda]')"
    if not _installed("numba") or importlib.util.find_spec("numba.cuda") is None:
        return False, "numba-cuda not installed (pip install 'eff_attn[cuda]')"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # any CUDA runtime failure means "no usable device"
        return False, f"cupy: no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "cupy: no CUDA device"
    return True, f"cupy with {count} CUDA device(s)"


def available(backend: str) -> tuple[bool, str]:
    """Return ``(ok, reason)`` for ``backend``."""
    if backend == "numpy":
        return True, "numpy installed"
    if backend == "numba":
        return _numba_status()
    if backend == "cupy":
        if _EMULATE["cupy"]:
            return True, "cupy emulated on NumPy (numba.cuda simulator)"
        return _cupy_status()
    return False, f"unknown backend {backend!r}"


def emulating(backend: str, problem) -> bool:
    """True when ``backend`` runs emulated on host arrays."""
    return backend == "cupy" and _EMULATE["cupy"] and problem.device == "cpu"


@contextlib.contextmanager
def emulate_cupy():
    """Run the ``cupy`` backend's code on NumPy arrays, for tests and docs.

    Array-level steps use ``xp = numpy``; ``numba.cuda`` kernels run under the
    CUDA simulator, which must be enabled before ``numba.cuda`` is imported
    (``NUMBA_ENABLE_CUDASIM=1``). Only tiny shapes are practical.
    """
    if "numba.cuda" not in sys.modules and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    previous = _EMULATE["cupy"]
    _EMULATE["cupy"] = True
    try:
        yield
    finally:
        _EMULATE["cupy"] = previous


def backend_report() -> dict[str, dict]:
    """What each backend needs and whether it is usable here."""
    return {
        name: {"available": ok, "reason": why}
        for name in ("numpy", "numba", "cupy")
        for ok, why in [available(name)]
    }
