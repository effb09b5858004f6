"""Nystrom attention in NumPy: the textbook, and the oracle of the other backends.

Per (batch, head) slice, with ``q~ = a_q q`` and ``k~ = a_k k`` (``a_q a_k = s``,
``sqrt(s)`` each by default) and ``m`` floor segments
``[floor(tN/m), floor((t+1)N/m))``::

    q_hat = A_seg^q q~,   k_hat = A_seg^k k~      segment means of the kept tokens
    F = softmax(q~ k_hat^T)                        (Nq, m)
    A = softmax(q_hat k_hat^T)                     (m, m)
    B = softmax(q_hat k~^T)                        (m, Nk)
    Z ~ A^+                                        iterative (or SVD) pseudo-inverse
    out = F (Z (B v))                              (Nq, Dv)

Invalid landmarks (segments with no kept token) get score ``-inf`` as key
landmarks and zero rows as query landmarks. Time
``O(m (Nq + Nk)(D + Dv) + m^3 pinv_iters)``, memory ``O(m (Nq + Nk) + m^2)``.

Every function takes the array module ``xp``, so the CuPy backend runs this
same array program on the GPU.
"""

from __future__ import annotations

import numpy as np

from ..._array import swap_last
from ..._softmax import masked_softmax, masked_softmax_backward, softmax_attend
from ._common import input_scales, segment_bounds

__all__ = [
    "averaging_matrix",
    "iterative_pinv",
    "iterative_pinv_backward",
    "exact_pinv",
    "exact_pinv_backward",
    "pinv_residual",
    "nystrom_reference",
    "nystrom_backward",
    "forward",
    "backward",
]


def averaging_matrix(N: int, m: int, keep=None, xp=np, dtype=np.float64):
    """Rows that average the kept tokens of each floor segment.

    Parameters
    ----------
    N, m : int
    keep : bool array of shape (G, N), optional

    Returns
    -------
    A_seg : array of shape (G, m, N), or (m, N) without ``keep``
        ``A_seg[t, j] = 1 / n_t`` for kept ``j`` in segment ``t`` (``n_t``
        kept tokens in it), else 0.
    valid : bool array of shape (G, m), or (m,)
        ``n_t > 0``; a segment with no kept token gives an invalid landmark.
    """
    bounds = segment_bounds(N, m, xp)                                       # (m + 1,)
    j = xp.arange(N)                                                        # (N,)
    member = (j >= bounds[:-1, None]) & (j < bounds[1:, None])              # (m, N)
    if keep is not None:
        member = member & keep[:, None, :]                                  # (G, m, N)
    count = member.sum(axis=-1)                                             # (G, m)
    A_seg = member / xp.where(count > 0, count, 1)[..., None]               # (G, m, N)
    return A_seg.astype(dtype, copy=False), count > 0


def iterative_pinv(A, iters: int, xp=np):
    """Iterative pseudo-inverse, normalised per (batch, head) slice.

    ``Z0 = A^T / (c r)`` with ``c = max_j sum_i A_ij`` (largest column sum)
    and ``r = max_i sum_j A_ij`` (largest row sum) of each slice; then, with
    ``T = A Z``::

        Z <- Z (13 I - T (15 I - T (7 I - T))) / 4

    The residual ``E = I - A Z`` obeys ``E <- (3 E^3 + E^4) / 4``, so the
    iteration converges (at third order) once ``||E|| < 1``. Zero rows and
    columns of ``A`` give zero columns and rows of ``Z``.

    Parameters
    ----------
    A : array of shape (G, m, m)
    iters : int

    Returns
    -------
    Z : array of shape (G, m, m)
    Zs : list of ``iters + 1`` arrays of shape (G, m, m)
        ``Z0 ... Z_iters``, saved for the backward.
    """
    m = A.shape[-1]
    c = A.sum(axis=-2).max(axis=-1)                                         # (G,) largest column sum
    r = A.sum(axis=-1).max(axis=-1)                                         # (G,) largest row sum
    cr = (c * r)[:, None, None]                                             # (G, 1, 1)
    Z = swap_last(A) / xp.where(cr > 0, cr, 1)                              # (G, m, m) Z0
    eye = xp.eye(m, dtype=A.dtype)                                          # (m, m)
    Zs = [Z]
    for _ in range(iters):
        T = A @ Z                                                           # (G, m, m)
        Z = 0.25 * Z @ (13 * eye - T @ (15 * eye - T @ (7 * eye - T)))      # (G, m, m)
        Zs.append(Z)
    return Z, Zs


def iterative_pinv_backward(dZ, A, Zs, xp=np):
    """Pullback of :func:`iterative_pinv` to ``A``, with the iterations unrolled.

    One step in reverse, with ``U = 7I - T``, ``W = 15I - TU``,
    ``Pi = 13I - TW`` and ``G = dZ_new``::

        dZ  = G Pi^T / 4,        dPi = Z^T G / 4
        dT  = -dPi W^T,          dW  = -T^T dPi
        dT += -dW U^T + T^T dW
        dA += dT Z^T,            dZ += A^T dT

    Then through ``Z0 = A^T / (c r)``: ``dA += dZ0^T / (c r)``, and with
    ``kappa = <dZ0, A^T> / (c r)^2`` the argmax column of the column sums
    loses ``kappa r`` and the argmax row of the row sums loses ``kappa c``.

    Parameters
    ----------
    dZ : array of shape (G, m, m)
    A : array of shape (G, m, m)
    Zs : list of arrays of shape (G, m, m), from :func:`iterative_pinv`

    Returns
    -------
    dA : array of shape (G, m, m)
    """
    m = A.shape[-1]
    eye = xp.eye(m, dtype=A.dtype)                                          # (m, m)
    dA = xp.zeros_like(A)                                                   # (G, m, m)
    G_ = dZ                                                                 # (G, m, m)
    for Z in reversed(Zs[:-1]):
        T = A @ Z                                                           # (G, m, m)
        U = 7 * eye - T                                                     # (G, m, m)
        W = 15 * eye - T @ U                                                # (G, m, m)
        Pi = 13 * eye - T @ W                                               # (G, m, m)
        dZ_step = 0.25 * G_ @ swap_last(Pi)                                 # (G, m, m)
        dPi = 0.25 * swap_last(Z) @ G_                                      # (G, m, m)
        dT = -dPi @ swap_last(W)                                            # (G, m, m)
        dW = -swap_last(T) @ dPi                                            # (G, m, m)
        dT = dT - dW @ swap_last(U) + swap_last(T) @ dW                     # (G, m, m)
        dA = dA + dT @ swap_last(Z)                                         # (G, m, m)
        G_ = dZ_step + swap_last(A) @ dT                                    # (G, m, m)
    col_sums, row_sums = A.sum(axis=-2), A.sum(axis=-1)                     # (G, m), (G, m)
    c, r = col_sums.max(axis=-1), row_sums.max(axis=-1)                     # (G,), (G,)
    cr = c * r                                                              # (G,)
    safe = xp.where(cr > 0, cr, 1)                                          # (G,)
    kappa = xp.where(cr > 0, (G_ * swap_last(A)).sum(axis=(-2, -1)) / safe**2, 0)  # (G,)
    best_col = xp.arange(m) == xp.argmax(col_sums, axis=-1)[:, None]        # (G, m)
    best_row = xp.arange(m) == xp.argmax(row_sums, axis=-1)[:, None]        # (G, m)
    dA = dA + swap_last(G_) / safe[:, None, None]                           # (G, m, m); A = 0 when cr = 0
    dA = dA - (kappa * r)[:, None, None] * best_col[:, None, :]             # column j*: -kappa r
    dA = dA - (kappa * c)[:, None, None] * best_row[:, :, None]             # row i*:    -kappa c
    return dA


def exact_pinv(A, xp=np):
    """Moore-Penrose pseudo-inverse by SVD, per slice, shape (G, m, m).

    The SVD runs in float64 whatever the input dtype (this mode is the
    oracle, and LAPACK builds differ most in float32). Singular values at or
    below ``m * eps * sigma_max``, with ``eps`` of the *input* dtype, count as
    zero (the NumPy ``pinv`` rule), so zero rows and columns stay zero.
    """
    U, sigma, Vh = xp.linalg.svd(A.astype(np.float64))                      # (G, m, m), (G, m), (G, m, m)
    cutoff = A.shape[-1] * np.finfo(A.dtype).eps * sigma.max(axis=-1, keepdims=True)  # (G, 1)
    kept = sigma > cutoff                                                   # (G, m)
    inv_sigma = xp.where(kept, 1 / xp.where(kept, sigma, 1), 0)             # (G, m)
    Z = (swap_last(Vh) * inv_sigma[:, None, :]) @ swap_last(U)              # (G, m, m)
    return Z.astype(A.dtype, copy=False)


def exact_pinv_backward(dZ, A, Z, xp=np):
    """Pullback of the pseudo-inverse at constant rank (Golub & Pereyra)::

        dA = -Z^T dZ Z^T + (I - A Z) dZ^T Z Z^T + Z^T Z dZ^T (I - Z A)

    Parameters
    ----------
    dZ, A, Z : arrays of shape (G, m, m)

    Returns
    -------
    dA : array of shape (G, m, m)
    """
    eye = xp.eye(A.shape[-1], dtype=A.dtype)                                # (m, m)
    Zt, dZt = swap_last(Z), swap_last(dZ)                                   # (G, m, m)
    return -Zt @ dZ @ Zt + (eye - A @ Z) @ dZt @ Z @ Zt + Zt @ Z @ dZt @ (eye - Z @ A)


def pinv_residual(A, Z, xp=np):
    """``||A Z A - A||_F / ||A||_F`` per slice, shape (G,); 0 where ``A = 0``."""
    num = xp.sqrt(((A @ Z @ A - A) ** 2).sum(axis=(-2, -1)))                # (G,)
    den = xp.sqrt((A**2).sum(axis=(-2, -1)))                                # (G,)
    return xp.where(den > 0, num / xp.where(den > 0, den, 1), 0)            # (G,)


def _landmark_inputs(q, k, mask, scale, m, xp):
    """Scaled inputs, averaging matrices and landmarks shared by forward and backward."""
    Nq, Nk = q.shape[-2], k.shape[-2]
    a_q, a_k = input_scales(scale)
    qt, kt = a_q * q, a_k * k                                               # (G, Nq, D), (G, Nk, D)
    keep_q = mask if Nq == Nk else None                                     # masked positions leave q_hat too
    Aq, valid_q = averaging_matrix(Nq, m, keep_q, xp, q.dtype)              # (G|, m, Nq), (G|, m)
    Ak, valid_k = averaging_matrix(Nk, m, mask, xp, q.dtype)                # (G|, m, Nk), (G|, m)
    G = q.shape[0]
    valid_q = xp.broadcast_to(valid_q, (G, m))                              # (G, m)
    valid_k = xp.broadcast_to(valid_k, (G, m))                              # (G, m)
    q_hat, k_hat = Aq @ qt, Ak @ kt                                         # (G, m, D), (G, m, D)
    return qt, kt, Aq, Ak, q_hat, k_hat, valid_q, valid_k


def nystrom_reference(q, k, v, *, mask=None, scale, num_landmarks, pinv="iterative", pinv_iters=6, xp=np):
    """Nystrom attention, step by step (see the module docstring).

    Parameters
    ----------
    q : array of shape (G, Nq, D)
    k : array of shape (G, Nk, D)
    v : array of shape (G, Nk, Dv)
    mask : bool array of shape (G, Nk), optional
    scale : float
    num_landmarks : int
        ``m`` in ``[1, min(Nq, Nk)]``.
    pinv : {"iterative", "exact"}
    pinv_iters : int

    Returns
    -------
    out : array of shape (G, Nq, Dv)
    res : dict
        ``F, A, B, Z, Zs, BV, W`` and the landmarks, for the backward, plus
        ``valid_q``, ``valid_k`` (G, m) and ``pinv_residual`` (G,).
    """
    m = num_landmarks
    qt, kt, Aq, Ak, q_hat, k_hat, valid_q, valid_k = _landmark_inputs(q, k, mask, scale, m, xp)
    keep_k = xp.ones(k.shape[:2], dtype=bool) if mask is None else mask     # (G, Nk)
    F_visible = valid_k[:, None, :]                                         # (G, 1, m)
    A_visible = valid_q[:, :, None] & valid_k[:, None, :]                   # (G, m, m)
    B_visible = valid_q[:, :, None] & keep_k[:, None, :]                    # (G, m, Nk)
    A, _ = masked_softmax(q_hat @ swap_last(k_hat), A_visible, xp)          # (G, m, m)
    BV, _, B = softmax_attend(q_hat @ swap_last(kt), B_visible, v, xp)      # (G, m, Dv), (G, m, Nk)
    if pinv == "exact":
        Z, Zs = exact_pinv(A, xp), None                                     # (G, m, m)
    else:
        Z, Zs = iterative_pinv(A, pinv_iters, xp)                           # (G, m, m)
    W = Z @ BV                                                              # (G, m, Dv)
    out, _, F = softmax_attend(qt @ swap_last(k_hat), F_visible, W, xp)     # (G, Nq, Dv), (G, Nq, m)
    res = {
        "F": F, "A": A, "B": B, "Z": Z, "Zs": Zs, "BV": BV, "W": W,
        "valid_q": valid_q, "valid_k": valid_k, "pinv_residual": pinv_residual(A, Z, xp),
    }
    return out, res


def nystrom_backward(dout, q, k, v, res, *, mask=None, scale, num_landmarks, pinv="iterative", xp=np):
    """Gradients of :func:`nystrom_reference`, every step differentiated.

    With ``P = softmax(X)`` each softmax pulls back as
    ``dX = P * (dP - rowsum(dP * P))``, and, from the output inwards::

        dW  = F^T dO,        dF  = dO W^T
        dZ  = dW (B v)^T,    dBV = Z^T dW
        dB  = dBV v^T,       dv  = B^T dBV
        dA  = pinv pullback of dZ (iterations unrolled, or the SVD formula)
        dq~ = dS_F k_hat + A_seg^{qT} (dS_A k_hat + dS_B k~)
        dk~ = dS_B^T q_hat + A_seg^{kT} (dS_F^T q~ + dS_A^T q_hat)

    and ``dq = a_q dq~``, ``dk = a_k dk~``. Time and memory as the forward.

    Returns
    -------
    dq : array of shape (G, Nq, D)
    dk : array of shape (G, Nk, D)
    dv : array of shape (G, Nk, Dv)
    """
    m = num_landmarks
    a_q, a_k = input_scales(scale)
    qt, kt, Aq, Ak, q_hat, k_hat, _, _ = _landmark_inputs(q, k, mask, scale, m, xp)
    F, A, B, Z, BV, W = (res[name] for name in ("F", "A", "B", "Z", "BV", "W"))
    dW = swap_last(F) @ dout                                                # (G, m, Dv)
    dF = dout @ swap_last(W)                                                # (G, Nq, m)
    dZ = dW @ swap_last(BV)                                                 # (G, m, m)
    dBV = swap_last(Z) @ dW                                                 # (G, m, Dv)
    dB = dBV @ swap_last(v)                                                 # (G, m, Nk)
    dv = swap_last(B) @ dBV                                                 # (G, Nk, Dv)
    if pinv == "exact":
        dA = exact_pinv_backward(dZ, A, Z, xp)                              # (G, m, m)
    else:
        dA = iterative_pinv_backward(dZ, A, res["Zs"], xp)                  # (G, m, m)
    dSF = masked_softmax_backward(dF, F, xp)                                # (G, Nq, m)
    dSA = masked_softmax_backward(dA, A, xp)                                # (G, m, m)
    dSB = masked_softmax_backward(dB, B, xp)                                # (G, m, Nk)
    dq_hat = dSA @ k_hat + dSB @ kt                                         # (G, m, D)
    dk_hat = swap_last(dSF) @ qt + swap_last(dSA) @ q_hat                   # (G, m, D)
    dqt = dSF @ k_hat + swap_last(Aq) @ dq_hat                              # (G, Nq, D)
    dkt = swap_last(dSB) @ q_hat + swap_last(Ak) @ dk_hat                   # (G, Nk, D)
    return a_q * dqt, a_k * dkt, dv


def forward(q, k, v, *, mask, offset, scale, num_landmarks, pinv="iterative", pinv_iters=6, xp=np):
    """Backend entry point (``offset`` is always None: causal is refused)."""
    return nystrom_reference(q, k, v, mask=mask, scale=scale, num_landmarks=num_landmarks, pinv=pinv,
                             pinv_iters=pinv_iters, xp=xp)


def backward(dout, q, k, v, out, res, *, mask, offset, scale, num_landmarks, pinv="iterative", pinv_iters=6, xp=np):
    """Backend entry point for the pullback."""
    return nystrom_backward(dout, q, k, v, res, mask=mask, scale=scale, num_landmarks=num_landmarks, pinv=pinv,
                            xp=xp)
