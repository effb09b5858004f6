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
from .methods.yoso import yoso_attention
from .methods.kdeformer import kdeformer_attention
from .methods.local import local_attention
from .methods.performer import performer_attention
from .methods.routing import routing_attention
from .methods.nystrom import nystrom_attention
from .methods.reformer import reformer_attention
from .methods.treeformer import treeformer_tc_attention, treeformer_tf_attention
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
    "yoso_attention",
    "kdeformer_attention",
    "local_attention",
    "performer_attention",
    "routing_attention",
    "nystrom_attention",
    "reformer_attention",
    "treeformer_tf_attention",
    "treeformer_tc_attention",
    "entmax_attention",
    "sparsemax",
    "entmax15",
    "entmax_bisect",
    "sparsemax_vjp",
    "entmax15_vjp",
    "entmax_bisect_vjp",
    "sparsefinder_attention",
]
