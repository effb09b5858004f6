"""Exact attention on the GPU: the blocked online softmax of :mod:`eff_attn._softmax_cupy`.

Matches :func:`eff_attn.methods.exact.reference.exact_blocked`. The kernels, their
blocking and their invariants live in the core module, since entmax with alpha = 1
runs the same code.
"""

from __future__ import annotations

from ..._softmax_cupy import blocked_backward as backward
from ..._softmax_cupy import blocked_forward as forward

__all__ = ["forward", "backward"]
