"""eff_attn as a differentiable attention backend for PyTorch.

:func:`attention` is a :class:`torch.autograd.Function`: the forward runs the
package's kernels on the tensors' memory (DLPack, no copy for contiguous CPU
tensors and CUDA tensors), and the backward is the package's own pullback
(:func:`eff_attn.attention_vjp`), so gradients are those of the method's
docs page, including its documented surrogates. :class:`EffAttention` is a
drop-in ``nn.Module``.

CPU tensors run on the ``numpy``/``numba`` backends and CUDA tensors on
``cupy``. float16 and bfloat16 are refused unless ``upcast_half=True``, which
computes in float32 and casts the result (and the gradients) back.

Importing this module imports torch; ``import eff_attn`` alone never does.
"""

from __future__ import annotations

import torch

from . import api
from .registry import NotSupportedError

__all__ = ["attention", "EffAttention"]

_HALF = (torch.float16, torch.bfloat16)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, options):
        needs_grad = any(ctx.needs_input_grad[:3])
        inputs = [t.detach() for t in (q, k, v)]
        m = None if mask is None else mask.detach()
        if needs_grad:
            out, vjp = api.attention_vjp(*inputs, mask=m, **options)
            ctx.vjp = vjp
        else:
            out = api.attention(*inputs, mask=m, **options)
        return out

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv = ctx.vjp(dout.contiguous())
        return dq, dk, dv, None, None


def attention(q, k, v, *, method="exact", backend="auto", mask=None, causal=False, scale=None, rng=None,
              upcast_half=False, **params):
    """Differentiable attention on torch tensors, by any eff_attn method.

    Parameters
    ----------
    q : torch.Tensor of shape (..., Nq, D)
    k : torch.Tensor of shape (..., Nk, D)
    v : torch.Tensor of shape (..., Nk, Dv)
    method, backend, causal, scale, rng, **params
        As in :func:`eff_attn.attention`. ``causal=True`` is bottom-right
        aligned; pass ``causal="top_left"`` for SDPA's ``is_causal=True``.
    mask : bool torch.Tensor of shape (..., Nk), optional
        Key keep-mask (True = may attend), on the same device.
    upcast_half : bool, default=False
        Compute float16/bfloat16 inputs in float32 and cast back. Without it
        such inputs raise :class:`eff_attn.NotSupportedError`.

    Returns
    -------
    torch.Tensor of shape (..., Nq, Dv)
        On the inputs' device, in their dtype; differentiable with respect to
        q, k and v through the method's backward pass. Randomised methods
        replay the forward's draws in the backward.
    """
    dtype = q.dtype
    if dtype in _HALF or k.dtype in _HALF or v.dtype in _HALF:
        if not upcast_half:
            raise NotSupportedError(
                f"torch inputs of dtype {dtype} are not computed in half precision; pass upcast_half=True "
                "to compute in float32 and cast back, or cast them yourself"
            )
        q, k, v = q.float(), k.float(), v.float()
    options = {"method": method, "backend": backend, "causal": causal, "scale": scale, "rng": rng, **params}
    out = _Attention.apply(q, k, v, mask, options)
    return out.to(dtype) if out.dtype != dtype else out


class EffAttention(torch.nn.Module):
    """Drop-in attention module backed by eff_attn.

    ``EffAttention(method="performer", num_features=256)(q, k, v)`` replaces
    ``torch.nn.functional.scaled_dot_product_attention(q, k, v)`` (with
    ``causal="top_left"`` for its ``is_causal=True``). Parameters fixed at
    construction apply to every call.

    Parameters
    ----------
    method : str, default="exact"
    backend : str, default="auto"
    causal : bool or str, default=False
    scale : float, optional
    rng : None, int or numpy.random.Generator
    upcast_half : bool, default=False
    **params
        The method's own parameters.
    """

    def __init__(self, method="exact", *, backend="auto", causal=False, scale=None, rng=None,
                 upcast_half=False, **params):
        super().__init__()
        self.method = method
        self.options = {"backend": backend, "causal": causal, "scale": scale, "rng": rng,
                        "upcast_half": upcast_half, **params}

    def forward(self, q, k, v, mask=None):
        """Attention of ``q (..., Nq, D)`` over ``k (..., Nk, D)``, ``v (..., Nk, Dv)``."""
        return attention(q, k, v, method=self.method, mask=mask, **self.options)

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self.options.items() if v not in (None, False, "auto")}
        return f"method={self.method!r}" + "".join(f", {k}={v!r}" for k, v in shown.items())
