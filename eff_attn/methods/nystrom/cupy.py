"""Nystrom attention on the GPU: the reference's array program, run by CuPy.

Matches :func:`eff_attn.methods.nystrom.reference.nystrom_reference`, which
is written against an array module ``xp`` so that every step is already a
GPU step here:

- the landmarks are one batched cuBLAS product with the (m, N) averaging
  matrix (a prefix-sum difference would cancel badly in float32);
- ``F``, ``A`` and ``B`` are batched products followed by CuPy's fused
  reductions for the masked softmax;
- the pseudo-inverse iteration is four batched (m, m) products per step
  (``"exact"``: a batched SVD);
- the backward is the reference's pullback, also through ``xp``.

Memory ``O(G m (Nq + Nk) + G m^2)``; no (Nq, Nk) array is formed. TF32 stays
off (CuPy's default), so float32 products are IEEE float32.
"""

from __future__ import annotations

from ..._cuda import xp_of
from . import reference

__all__ = ["forward", "backward"]


def forward(q, k, v, *, mask, offset, scale, num_landmarks, pinv="iterative", pinv_iters=6):
    return reference.forward(q, k, v, mask=mask, offset=offset, scale=scale, num_landmarks=num_landmarks,
                             pinv=pinv, pinv_iters=pinv_iters, xp=xp_of(q))


def backward(dout, q, k, v, out, res, *, mask, offset, scale, num_landmarks, pinv="iterative", pinv_iters=6):
    return reference.backward(dout, q, k, v, out, res, mask=mask, offset=offset, scale=scale,
                              num_landmarks=num_landmarks, pinv=pinv, pinv_iters=pinv_iters, xp=xp_of(q))
