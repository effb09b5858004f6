"""The backend test-class pattern; see ``tests/conftest.py``.

Backend agreement has one convention: a test that compares its backend with
the NumPy reference takes the ``numpy_reference`` fixture of
:class:`BackendCase` and computes the expected values through it::

    def test_agrees_with_numpy_reference(self, numpy_reference):
        out = self.run(q, k, v, rng=4)
        assert_close(out, numpy_reference.run(q, k, v, rng=4), rel=1e-10)

The fixture skips the test on the NumPy class itself, where it could only
compare NumPy with NumPy and so could never fail.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import eff_attn
from eff_attn import _backend
from eff_attn.testing import emulate_cupy


class NumpyReference:
    """One method on the NumPy backend: what every other backend agrees with."""

    def __init__(self, method: str):
        self.method = method

    def run(self, q, k, v, **kw):
        """``eff_attn.attention`` on the NumPy backend (host arrays)."""
        kw.setdefault("method", self.method)
        return eff_attn.attention(q, k, v, backend="numpy", **kw)

    def run_vjp(self, q, k, v, **kw):
        """``eff_attn.attention_vjp`` on the NumPy backend (host arrays)."""
        kw.setdefault("method", self.method)
        return eff_attn.attention_vjp(q, k, v, backend="numpy", **kw)


class BackendCase:
    """Base of every per-method test class; see the module docstring."""

    METHOD = "exact"
    BACKEND = "numpy"
    EMULATED = False

    @pytest.fixture(autouse=True)
    def _backend_context(self):
        if not self.EMULATED:
            ok, why = _backend.available(self.BACKEND)
            if not ok:
                pytest.skip(f"{self.BACKEND} backend unavailable: {why}")
        # Reference arithmetic must never divide by zero or make NaN.
        with np.errstate(divide="raise", invalid="raise"):
            if self.EMULATED:
                # The simulator runs each CUDA thread as a Python thread and every
                # cuda.syncthreads() waits for all of them to be scheduled: switch
                # threads every 10 us instead of every 5 ms (5-15x faster kernels).
                previous = sys.getswitchinterval()
                sys.setswitchinterval(1e-5)
                try:
                    with emulate_cupy():
                        yield
                finally:
                    sys.setswitchinterval(previous)
            else:
                yield

    @pytest.fixture
    def numpy_reference(self) -> NumpyReference:
        """The NumPy reference of ``self.METHOD``, for a backend-agreement test.

        Skips the test on the NumPy class, where agreement is NumPy with itself.
        """
        if self.BACKEND == "numpy":
            pytest.skip("backend agreement: the NumPy class would compare the reference with itself")
        return NumpyReference(self.METHOD)

    @property
    def small(self) -> bool:
        """True where shapes must stay tiny (the CUDA simulator)."""
        return self.EMULATED

    @property
    def examples(self) -> int:
        """Hypothesis examples per property test on this backend."""
        return 4 if self.EMULATED else 25

    def xp_in(self, a):
        """Move a host array to the backend's device (CuPy on a GPU)."""
        if self.BACKEND == "cupy" and not self.EMULATED and a is not None:
            import cupy

            return cupy.asarray(a)
        return a

    def run(self, q, k, v, **kw):
        """``eff_attn.attention`` of ``self.METHOD`` on this backend."""
        kw.setdefault("method", self.METHOD)
        if "mask" in kw:
            kw["mask"] = self.xp_in(kw["mask"])
        return eff_attn.attention(self.xp_in(q), self.xp_in(k), self.xp_in(v), backend=self.BACKEND, **kw)

    def run_vjp(self, q, k, v, **kw):
        """``eff_attn.attention_vjp`` of ``self.METHOD`` on this backend."""
        kw.setdefault("method", self.METHOD)
        if "mask" in kw:
            kw["mask"] = self.xp_in(kw["mask"])
        return eff_attn.attention_vjp(self.xp_in(q), self.xp_in(k), self.xp_in(v), backend=self.BACKEND, **kw)
