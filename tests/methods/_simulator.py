"""A test mixin for classes that run numba.cuda kernels under the CUDA simulator."""

from __future__ import annotations

import sys

import pytest


class FastSimulatorBarriers:
    """Switch Python threads every 10 us while a simulated class runs.

    The simulator runs each CUDA thread as a Python thread, and every block
    barrier (``cuda.syncthreads``) waits for all of them to be scheduled; at
    the default 5 ms switch interval a kernel with a reduction per bisection
    step takes tens of seconds on a tiny input. Only ``EMULATED`` classes
    change the interval.
    """

    EMULATED = False

    @pytest.fixture(autouse=True)
    def _fast_simulator_barriers(self):
        if not self.EMULATED:
            yield
            return
        previous = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            yield
        finally:
            sys.setswitchinterval(previous)
