"""eff_attn: efficient attention, taught and run.

Every method has a readable NumPy reference, a Numba CPU version and a CuPy
GPU version behind one API::

    import eff_attn
    out = eff_attn.attention(q, k, v, method="exact")
    out, info = eff_attn.exact_attention(q, k, v, causal=True, return_info=True)
    out, vjp = eff_attn.attention_vjp(q, k, v, method="exact")

Importing this package imports no method, and neither Numba, CuPy, torch nor
JAX: the names below load on first use (PEP 562), backends when first run.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the same names, for static readers (type checkers, the API docs)
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

#: Public name -> the module that defines it. Nothing is imported until a name
#: is first used (PEP 562), so ``import eff_attn`` loads no method.
_PUBLIC = {
    "attention": "eff_attn.api",
    "attention_vjp": "eff_attn.api",
    "backends": "eff_attn.api",
    "method_names": "eff_attn.registry",
    "NotSupportedError": "eff_attn.registry",
    "exact_attention": "eff_attn.methods.exact",
    "uniform_attention": "eff_attn.methods.uniform",
    "topk_oracle_attention": "eff_attn.methods.topk_oracle",
    "yoso_attention": "eff_attn.methods.yoso",
    "kdeformer_attention": "eff_attn.methods.kdeformer",
    "local_attention": "eff_attn.methods.local",
    "performer_attention": "eff_attn.methods.performer",
    "routing_attention": "eff_attn.methods.routing",
    "nystrom_attention": "eff_attn.methods.nystrom",
    "reformer_attention": "eff_attn.methods.reformer",
    "treeformer_tf_attention": "eff_attn.methods.treeformer",
    "treeformer_tc_attention": "eff_attn.methods.treeformer",
    "entmax_attention": "eff_attn.methods.entmax",
    "sparsemax": "eff_attn.methods.entmax",
    "entmax15": "eff_attn.methods.entmax",
    "entmax_bisect": "eff_attn.methods.entmax",
    "sparsemax_vjp": "eff_attn.methods.entmax",
    "entmax15_vjp": "eff_attn.methods.entmax",
    "entmax_bisect_vjp": "eff_attn.methods.entmax",
    "sparsefinder_attention": "eff_attn.methods.sparsefinder",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    """Import a public name, or a submodule (``eff_attn.registry``), on first use."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value                                                 # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
