"""eff_attn: efficient attention, taught and run.

Every method has a readable NumPy reference, a Numba CPU version and a CuPy
GPU version behind one API::

    import eff_attn
    out = eff_attn.attention(q, k, v, method="exact")
    out, info = eff_attn.exact_attention(q, k, v, causal=True, return_info=True)
    out, vjp = eff_attn.attention_vjp(q, k, v, method="exact")

Importing this package imports neither Numba, CuPy, torch nor JAX; backends
load when first used.
"""

from .api import attention, attention_vjp, backends
from .registry import NotSupportedError, method_names
from .methods.exact import exact_attention
from .methods.uniform import uniform_attention
from .methods.topk_oracle import topk_oracle_attention
from .methods.entmax import (
    entmax15, entmax15_vjp, entmax_attention, entmax_bisect, entmax_bisect_vjp, sparsemax, sparsemax_vjp,
)
from .methods.sparsefinder import sparsefinder_attention

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_vjp",
    "backends",
    "method_names",
    "NotSupportedError",
    "exact_attention",
    "uniform_attention",
    "topk_oracle_attention",
    "entmax_attention",
    "sparsemax",
    "entmax15",
    "entmax_bisect",
    "sparsemax_vjp",
    "entmax15_vjp",
    "entmax_bisect_vjp",
    "sparsefinder_attention",
]
