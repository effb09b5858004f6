"""Shared fixtures and the backend test-class pattern.

A method's tests live in one base class (derived from
``tests._harness.BackendCase``) with ``BACKEND = "numpy"``; the subclasses
change only the backend::

    class TestExact(BackendCase):            METHOD = "exact"
    class TestExactNumba(TestExact):         BACKEND = "numba"
    @pytest.mark.gpu
    class TestExactCupy(TestExact):          BACKEND = "cupy"
    @pytest.mark.cudasim
    class TestExactCupyEmulated(TestExact):  BACKEND = "cupy"; EMULATED = True

``EMULATED`` runs the CuPy backend's code on NumPy arrays with its
numba.cuda kernels under the CUDA simulator; tests read ``self.small`` to
keep shapes tiny there.

``global_random_seed`` runs once with seed 42, or for every seed 0-19 with
``EFF_ATTN_TEST_SEED=all`` (or a single seed, ``EFF_ATTN_TEST_SEED=7``).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest


def _has_cuda_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# numba.cuda must see the simulator switch before it is first imported.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _has_cuda_gpu():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import eff_attn  # noqa: E402
from eff_attn import _backend  # noqa: E402


def _seeds():
    value = os.environ.get("EFF_ATTN_TEST_SEED", "42")
    if value == "all":
        return list(range(20))
    if "-" in value:
        lo, hi = value.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(value)]


@pytest.fixture(params=_seeds())
def global_random_seed(request):
    """The seed of a randomised test (see the module docstring)."""
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _numba_warm_up():
    """Compile or load the exact Numba kernels once per session, off the clock of any one test."""
    if _backend.available("numba")[0]:
        q = np.zeros((1, 2, 2))
        eff_attn.attention(q, q, q, backend="numba")
    yield
