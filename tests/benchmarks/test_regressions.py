"""pytest-benchmark regression suite: one forward (and backward) per method and backend.

Deselected by default (``-m 'not benchmark'`` in the pytest settings); run it with

    python -m pytest -m benchmark tests/benchmarks --benchmark-autosave

and compare runs with ``--benchmark-compare``. Speed is measured here and by
``eff-attn compare``, never asserted in the unit tests.
"""

from __future__ import annotations

import numpy as np
import pytest

import eff_attn
from eff_attn import _backend, api, registry
from eff_attn.bench.problems import clustered

pytestmark = pytest.mark.benchmark

N, HEADS, D = 1024, 8, 64
BACKENDS = [b for b in ("numpy", "numba") if _backend.available(b)[0]]


@pytest.fixture(scope="module")
def problem():
    return clustered(N, d=D, heads=HEADS, seed=0).astype(np.float32)


def _prepared(method, backend, q, k, v, need_grad=False):
    try:
        return api.prepare(q, k, v, method=method, backend=backend, rng=0, need_grad=need_grad)
    except eff_attn.NotSupportedError as exc:
        pytest.skip(f"{method}/{backend} cannot run this problem: {str(exc).splitlines()[1].strip()}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", registry.method_names(builtin_only=True))
def test_forward(benchmark, problem, method, backend):
    call = _prepared(method, backend, *problem)
    call.run_forward()  # compile outside the timed rounds
    benchmark.group = f"forward N={N}"
    benchmark(call.run_forward)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", registry.method_names(builtin_only=True))
def test_forward_and_backward(benchmark, problem, method, backend):
    call = _prepared(method, backend, *problem, need_grad=True)
    out, res = call.run_forward()
    dout = np.ones_like(out)
    call.run_backward(dout, out, res)

    def step():
        o, r = call.run_forward()
        return call.run_backward(dout, o, r)

    benchmark.group = f"forward+backward N={N}"
    benchmark(step)
