"""Arrays in, arrays out: NumPy, CuPy, torch and JAX at the API boundary.

The kernels see NumPy arrays (``numpy`` and ``numba`` backends) or CuPy
arrays (``cupy`` backend). torch tensors and JAX arrays enter through DLPack,
without a copy where the device allows, and the result goes back to the
caller's framework and device the same way.

Frameworks are recognised with :mod:`array_api_compat`'s ``is_*_array``
helpers, which look at ``sys.modules`` and never import a framework.
"""

from __future__ import annotations

import numpy as np
from array_api_compat import is_cupy_array, is_jax_array, is_numpy_array, is_torch_array

from .registry import NotSupportedError

__all__ = ["framework_of", "to_kernel_array", "from_kernel_array", "array_module"]

_HALF_DTYPES = ("float16", "bfloat16")


def framework_of(x, name: str | None = None) -> str:
    """Name of the framework that owns ``x``: numpy, cupy, torch or jax.

    ``name`` (the argument's name) starts the error message when given.
    """
    if is_numpy_array(x) or isinstance(x, np.generic):
        return "numpy"
    if is_cupy_array(x):
        return "cupy"
    if is_torch_array(x):
        return "torch"
    if is_jax_array(x):
        return "jax"
    prefix = "" if name is None else f"{name}: "
    raise TypeError(f"{prefix}expected a NumPy, CuPy, torch or JAX array, got {type(x).__name__}")


def array_module(x):
    """The NumPy-like module (``numpy`` or ``cupy``) that operates on ``x``."""
    if is_cupy_array(x):
        import cupy

        return cupy
    return np


def _torch_device_kind(x) -> str:
    return "gpu" if x.device.type == "cuda" else "cpu"


def _jax_device_kind(x) -> str:
    platforms = {d.platform for d in x.devices()}
    return "gpu" if platforms & {"gpu", "cuda", "rocm"} else "cpu"


def to_kernel_array(x, name: str):
    """Return ``(array, framework, device)`` for the kernels.

    ``array`` is a NumPy array (host) or a CuPy array (GPU), shared with
    ``x`` through DLPack where possible.

    Raises
    ------
    TypeError
        If ``x`` is not an array of a known framework; the message starts
        with ``name``.
    NotSupportedError
        For float16/bfloat16 inputs (cast them to float32 first), and for
        torch tensors that require grad (use :mod:`eff_attn.torch`, which
        differentiates through the package's backward pass).
    """
    framework = framework_of(x, name)
    if framework == "numpy":
        return np.asarray(x), framework, "cpu"
    if framework == "cupy":
        return x, framework, "gpu"
    dtype = str(x.dtype).split(".")[-1]
    if dtype in _HALF_DTYPES:
        raise NotSupportedError(
            f"{name} has dtype {dtype}; eff_attn computes in float32 or float64. "
            f"Cast it first (e.g. {name}.float() in torch, {name}.astype('float32') in JAX)."
        )
    if framework == "torch":
        if x.requires_grad:
            raise NotSupportedError(
                f"{name} requires grad; eff_attn.attention does not record torch autograd. "
                "Use eff_attn.torch.attention (a torch.autograd.Function) or pass a detached tensor."
            )
        device = _torch_device_kind(x)
        x = x.contiguous()
    else:
        device = _jax_device_kind(x)
    if device == "gpu":
        import cupy

        return cupy.from_dlpack(x), framework, device
    return np.from_dlpack(x), framework, device


def from_kernel_array(a, framework: str):
    """Return the kernel result ``a`` in ``framework``, on the same device."""
    if framework in ("numpy", "cupy"):
        return a
    if framework == "torch":
        import torch

        return torch.from_dlpack(a)
    import jax.numpy as jnp

    return jnp.from_dlpack(a)
