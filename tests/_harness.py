"""The backend test-class pattern; see ``tests/conftest.py``."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import eff_attn
from eff_attn import _backend
from eff_attn.testing import emulate_cupy


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
