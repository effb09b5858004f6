"""eff_attn as a differentiable attention backend for JAX (CPU).

:func:`attention` is a :func:`jax.custom_vjp` whose forward and backward are
host callbacks (:func:`jax.pure_callback`) into the package's kernels, so it
composes with ``jax.jit``, ``jax.grad`` and ``jax.vmap`` (sequentially). The
backward recomputes the forward on the host and applies the method's own
pullback, the price of keeping no host state between the two callbacks.

Randomised methods need one draw for the forward and its backward: the call
fixes an integer seed when it is traced. Under ``jax.jit`` that means
``rng=None`` draws once per compilation, not per call; pass ``rng`` (an int)
to control it.

float16/bfloat16 inputs are refused unless ``upcast_half=True`` (compute in
float32, cast back). Importing this module imports JAX; ``import eff_attn``
alone never does.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from . import api
from .random import as_generator
from .registry import NotSupportedError

__all__ = ["attention"]

_HALF = (jnp.float16, jnp.bfloat16)


def _seed(rng) -> int | None:
    if rng is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(rng, numbers.Integral):
        return int(rng)
    return int(as_generator(rng).integers(2**31))


def attention(q, k, v, *, method="exact", backend="auto", mask=None, causal=False, scale=None, rng=None,
              upcast_half=False, **params):
    """Differentiable attention on JAX arrays, by any eff_attn method (CPU).

    Parameters
    ----------
    q : jax.Array of shape (..., Nq, D)
    k : jax.Array of shape (..., Nk, D)
    v : jax.Array of shape (..., Nk, Dv)
    mask : bool jax.Array of shape (..., Nk), optional
    method, backend, causal, scale, rng, **params
        As in :func:`eff_attn.attention`; ``backend`` is a host backend
        (``numpy`` or ``numba``).
    upcast_half : bool, default=False
        Compute float16/bfloat16 inputs in float32 and cast back.

    Returns
    -------
    jax.Array of shape (..., Nq, Dv), in the inputs' dtype.
    """
    dtype = jnp.result_type(q)
    if any(jnp.result_type(a) in _HALF for a in (q, k, v)):
        if not upcast_half:
            raise NotSupportedError(
                f"JAX inputs of dtype {dtype} are not computed in half precision; pass upcast_half=True "
                "to compute in float32 and cast back, or cast them yourself"
            )
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    options = {"method": method, "backend": backend, "causal": causal, "scale": scale, "rng": _seed(rng), **params}
    has_mask = mask is not None
    mask_arr = jnp.asarray(mask) if has_mask else jnp.ones(k.shape[:-2] + (k.shape[-2],), dtype=bool)
    out_shape = jax.ShapeDtypeStruct(jnp.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], mask_arr.shape[:-1])
                                     + (q.shape[-2], v.shape[-1]), jnp.result_type(q))

    def host_forward(qh, kh, vh, mh):
        out = api.attention(np.asarray(qh), np.asarray(kh), np.asarray(vh), mask=np.asarray(mh) if has_mask else None,
                            **options)
        return np.asarray(out, dtype=out_shape.dtype)

    def host_backward(qh, kh, vh, mh, dout):
        _, vjp = api.attention_vjp(np.asarray(qh), np.asarray(kh), np.asarray(vh),
                                   mask=np.asarray(mh) if has_mask else None, **options)
        grads = vjp(np.asarray(dout))
        return tuple(np.asarray(g, dtype=a.dtype) for g, a in zip(grads, (qh, kh, vh)))

    @jax.custom_vjp
    def f(q_, k_, v_, m_):
        return jax.pure_callback(host_forward, out_shape, q_, k_, v_, m_, vmap_method="sequential")

    def f_fwd(q_, k_, v_, m_):
        return f(q_, k_, v_, m_), (q_, k_, v_, m_)

    def f_bwd(res, dout):
        q_, k_, v_, m_ = res
        shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q_, k_, v_))
        dq, dk, dv = jax.pure_callback(host_backward, shapes, q_, k_, v_, m_, dout, vmap_method="sequential")
        return dq, dk, dv, None

    f.defvjp(f_fwd, f_bwd)
    out = f(q, k, v, mask_arr)
    return out.astype(dtype) if out.dtype != dtype else out
