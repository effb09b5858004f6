"""alpha-entmax attention on the CPU: the kernels of :mod:`eff_attn._entmax_numba`.

Matches :mod:`eff_attn.methods.entmax.reference`. The kernels live in the core
module because the entmax transforms and Sparsefinder run them too.
"""

from __future__ import annotations

from ..._entmax_numba import backward, forward, rows_alpha_grad, rows_backward, rows_forward

__all__ = ["forward", "backward", "rows_forward", "rows_backward", "rows_alpha_grad"]
