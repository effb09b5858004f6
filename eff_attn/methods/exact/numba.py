"""Exact attention on the CPU: the blocked online softmax of :mod:`eff_attn._softmax_numba`.

Matches :func:`eff_attn.methods.exact.reference.exact_blocked`. The kernels, their
blocking and their invariants live in the core module, since local attention runs
the same kernels over its window; exact attention is the band that covers every
visible key.
"""

from __future__ import annotations

from ..._softmax_numba import blocked_backward as backward
from ..._softmax_numba import blocked_forward as forward

__all__ = ["forward", "backward"]
