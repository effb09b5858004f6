"""FAVOR+ in NumPy: positive random features, stable shifts, chunked causal prefix sums.

Per (batch, head) slice, with ``x~ = sqrt(s) x`` and the feature matrix
``Omega`` (m, D)::

    lambda_r(x) = omega_r . x~ - |x~|^2 / 2                      (m,)
    a_i = exp(lambda(q_i) - max_r lambda_r(q_i))                query features, max 1
    b_j = exp(lambda(k_j) - M)                                  key features at a shared shift M
    out_i = a_i^T (sum_j b_j v_j^T) / a_i^T (sum_j b_j)

Both shifts cancel in the ratio, so this equals the textbook
``phi = exp(lambda) / sqrt(m)``, whose expectation is the softmax kernel.
Appending a column of ones to ``v`` (``vx = [v, 1]``) carries the
denominator along with the numerator: ``[num_i, den_i] = a_i^T sum_j b_j vx_j^T``.

The algorithm every backend runs, in three phases:

1. **chunk states.** Keys are cut into chunks of ``C``; chunk ``c`` gets its
   shift ``s_c`` (its max of ``lambda`` over kept keys), its features
   ``b_j = exp(lambda(k_j) - s_c)`` and its state ``S_c = sum_j b_j vx_j^T``.
2. **scan.** Non-causal: the states are summed at the global shift,
   ``Sigma = sum_c exp(s_c - M) S_c``. Causal: a scan keeps the running
   shift ``T_c = max(T_(c-1), s_c)`` and the exclusive prefix
   ``E_(c+1) = exp(T_(c-1) - T_c) E_c + exp(s_c - T_c) S_c`` (every factor <= 1).
3. **outputs.** Non-causal: ``[num, den] = a Sigma``. Causal: queries sit in
   the chunk of their position; a query in chunk ``c`` adds the prefix and
   the keys of its own chunk up to its position, all at the shift ``T_c``:
   ``alpha_c a_i^T E_c + beta_c sum_(j in c, j <= p_i) (a_i . b_j) vx_j``.

This reference uses one chunk of all keys when not causal (so ``M`` is
plainly the max over kept keys). Time ``O((Nq + Nk) m (D + Dv))`` plus
``O(Nq C (m + Dv))`` causal; memory ``O((Nq + Nk) m + (N / C) m Dv)``.
The functions take the array module ``xp``, so the CuPy backend runs
phases 1 and 3 and the backward as they are.
"""

from __future__ import annotations

import math

import numpy as np

from ..._array import swap_last, to_host
from ._common import causal_layout, feature_ratio, key_shifts, rescale, scan_factors, total_factors

__all__ = [
    "feature_logits",
    "query_features",
    "chunk_states",
    "exclusive_scan",
    "performer_reference",
    "performer_backward",
    "input_gradient",
    "add_shift_gradients",
    "forward",
    "backward",
]


def feature_logits(x, omega, sqrt_s, xp=np):
    """``lambda(x) = Omega x~ - |x~|^2 / 2`` with ``x~ = sqrt(s) x``.

    Parameters
    ----------
    x : array of shape (G, N, D)
    omega : array of shape (G or 1, m, D)
    sqrt_s : float

    Returns
    -------
    lam : array of shape (G, N, m)
    xt : array of shape (G, N, D), the scaled inputs
    """
    xt = x * x.dtype.type(sqrt_s)                                           # (G, N, D)
    half_norm = 0.5 * (xt * xt).sum(axis=-1, keepdims=True)                 # (G, N, 1)
    return xt @ swap_last(omega) - half_norm, xt                            # (G, N, m), (G, N, D)


def _features(lam, shift, eps, ratio, variant, xp=np):
    """``ratio * (exp(lambda - shift) + eps)``; the textbook form raises on overflow."""
    if variant == "textbook":
        with np.errstate(over="ignore"):
            e = xp.exp(lam - shift)
        if not bool(xp.isfinite(e).all()):
            raise FloatingPointError("variant='textbook': exp(lambda) overflowed; use variant='stable'")
    else:
        e = xp.exp(lam - shift)                                             # <= 1: lam <= shift
    if eps:
        e = e + lam.dtype.type(eps)
    return e * lam.dtype.type(ratio) if ratio != 1 else e


def query_features(q, omega, sqrt_s, *, variant, eps, ratio, xp=np):
    """Query features ``a`` (G, Nq, m) and the scaled queries ``q~`` (G, Nq, D).

    Stable: shifted by each query's own max, so every row's largest feature
    is 1 (times ``ratio``, plus ``eps``). Textbook: unshifted.
    """
    lam, qt = feature_logits(q, omega, sqrt_s, xp)                          # (G, Nq, m)
    shift = lam.max(axis=-1, keepdims=True) if variant == "stable" else 0   # (G, Nq, 1)
    return _features(lam, shift, eps, ratio, variant, xp), qt              # (G, Nq, m), (G, Nq, D)


def _pad_chunks(x, n_c, chunk, xp=np):
    """Rows (G, N, F) zero-padded to ``n_c * chunk`` and cut into chunks (G, n_c, chunk, F)."""
    G, N, F = x.shape
    if n_c * chunk > N:
        x = xp.concatenate([x, xp.zeros((G, n_c * chunk - N, F), dtype=x.dtype)], axis=1)
    return x.reshape(G, n_c, chunk, F)


def chunk_states(k, v, mask, omega, sqrt_s, *, n_c, chunk, variant, eps, ratio, xp=np):
    """Phase 1: key features, chunk shifts and chunk states.

    Returns
    -------
    b : array of shape (G, n_c, C, m)
        ``ratio (exp(lambda(k_j) - s_c) + eps)`` on kept keys, 0 on masked
        keys and padding.
    shifts : array of shape (G, n_c)
        ``s_c`` (see :func:`eff_attn.methods.performer._common.key_shifts`).
    vx : array of shape (G, n_c, C, Dv + 1)
        ``[v, 1]`` on kept keys, 0 elsewhere.
    S : array of shape (G, n_c, m, Dv + 1)
        ``S_c = sum_(j in c) b_j vx_j^T``.
    kt : array of shape (G, Nk, D), the scaled keys (masked rows 0)
    """
    G, Nk, _ = k.shape
    kept = xp.ones((G, Nk), dtype=bool) if mask is None else xp.broadcast_to(mask, (G, Nk))  # (G, Nk)
    k = xp.where(kept[..., None], k, 0)                                     # masked keys never enter the arithmetic
    lam, kt = feature_logits(k, omega, sqrt_s, xp)                          # (G, Nk, m)
    ones = xp.ones((G, Nk, 1), dtype=v.dtype)                               # (G, Nk, 1)
    vx = xp.where(kept[..., None], xp.concatenate([v, ones], axis=-1), 0)   # (G, Nk, Dv + 1)
    lam = _pad_chunks(lam, n_c, chunk, xp)                                  # (G, n_c, C, m)
    vx = _pad_chunks(vx, n_c, chunk, xp)                                    # (G, n_c, C, Dv + 1)
    kept = _pad_chunks(kept[..., None], n_c, chunk, xp)                     # (G, n_c, C, 1)
    chunk_max = xp.where(kept, lam, -xp.inf).max(axis=(-2, -1))             # (G, n_c); -inf: nothing kept
    shifts = key_shifts(chunk_max, variant, eps, xp)                        # (G, n_c)
    safe = xp.where(xp.isfinite(shifts), shifts, 0)[..., None, None]        # (G, n_c, 1, 1)
    b = xp.where(kept, _features(xp.where(kept, lam, safe), safe, eps, ratio, variant, xp), 0)  # (G, n_c, C, m)
    S = swap_last(b) @ vx                                                   # (G, n_c, m, Dv + 1)
    return b, shifts, vx, S, kt


def exclusive_scan(x, decay, gain, *, reverse=False, xp=np):
    """``out[c]`` = the accumulator before chunk ``c``; then ``acc <- decay_c acc + gain_c x[c]``.

    In order of ``c`` (or reversed), starting from ``acc = 0``.

    Parameters
    ----------
    x : array of shape (G, n_c, m, F)
    decay, gain : arrays of shape (G, n_c)

    Returns
    -------
    array of shape (G, n_c, m, F)
    """
    out = xp.empty_like(x)
    acc = xp.zeros_like(x[:, 0])                                            # (G, m, F)
    n_c = x.shape[1]
    for c in (reversed(range(n_c)) if reverse else range(n_c)):
        out[:, c] = acc
        acc = decay[:, c, None, None] * acc + gain[:, c, None, None] * x[:, c]
    return out


def _causal_tril(chunk, xp=np):
    """``[t <= r]`` for query slot ``r`` and key slot ``t`` of one chunk, (C, C)."""
    return xp.arange(chunk)[None, :] <= xp.arange(chunk)[:, None]


def _factors(shifts, causal, xp):
    """Host scan factors of the (device) shifts, back on the device, in the shifts' dtype."""
    host = to_host(shifts)
    alpha, beta = scan_factors(host) if causal else (None, total_factors(host))
    to = lambda a: None if a is None else xp.asarray(a).astype(shifts.dtype)  # noqa: E731
    return to(alpha), to(beta)


def performer_reference(q, k, v, omega, *, mask=None, offset=None, scale, variant="stable", eps=0.0,
                        chunk_size=64, xp=np, scan=exclusive_scan):
    """FAVOR+ attention, in the three phases of the module docstring.

    Parameters
    ----------
    q : array of shape (G, Nq, D)
    k : array of shape (G, Nk, D)
    v : array of shape (G, Nk, Dv)
    omega : array of shape (G or 1, m, D), in the inputs' dtype
    mask : bool array of shape (G, Nk), optional
    offset : int, optional
        Causal offset; None when not causal.
    scale : float, positive
    variant : {"stable", "textbook"}
    eps : float
    chunk_size : int
        ``C`` of the causal prefix sums.
    scan : callable
        Phase 2, ``scan(x, decay, gain, reverse=..., xp=...)``:
        :func:`exclusive_scan` here, a numba.cuda kernel on the GPU.

    Returns
    -------
    out : array of shape (G, Nq, Dv)
    res : dict
        The features, states and factors the backward needs, and ``den``
        (G, Nq), each row's denominator (0: the row outputs 0).
    """
    G, Nq, _ = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    m = omega.shape[-2]
    sqrt_s = math.sqrt(scale)
    ratio = feature_ratio(variant, m)
    causal = offset is not None
    chunk = chunk_size if causal else Nk                                    # non-causal: one chunk of all keys
    n_c, i_first, p_first, n_valid = causal_layout(Nq, Nk, offset, chunk) if causal else (1, 0, 0, Nq)
    opts = dict(variant=variant, eps=eps, ratio=ratio, xp=xp)
    a, qt = query_features(q, omega, sqrt_s, **opts)                        # (G, Nq, m)
    b, shifts, vx, S, kt = chunk_states(k, v, mask, omega, sqrt_s, n_c=n_c, chunk=chunk, **opts)
    alpha, beta = _factors(shifts, causal, xp)                              # (G, n_c) each
    res = dict(a=a, qt=qt, b=b, vx=vx, kt=kt, alpha=alpha, beta=beta, layout=(n_c, chunk, i_first, p_first, n_valid))
    if not causal:
        total = (beta[..., None, None] * S).sum(axis=1)                    # (G, m, Dv + 1) at the global shift
        numden = a @ total                                                  # (G, Nq, Dv + 1)
        res["total"] = total
    else:
        E = scan(S, alpha, beta, xp=xp)                                   # (G, n_c, m, Dv + 1)
        A = _slots(a, n_c, chunk, i_first, p_first, n_valid, xp)            # (G, n_c, C, m)
        W = xp.where(_causal_tril(chunk, xp), A @ swap_last(b), 0)          # (G, n_c, C, C) query x key slot
        numden = alpha[..., None, None] * (A @ E) + beta[..., None, None] * (W @ vx)  # (G, n_c, C, Dv + 1)
        numden = _unslot(numden, Nq, i_first, p_first, n_valid, xp)        # (G, Nq, Dv + 1)
        res["E"] = E
    if variant == "textbook" and not bool(xp.isfinite(numden).all()):
        raise FloatingPointError("variant='textbook': the feature sums overflowed; use variant='stable'")
    num, den = numden[..., :Dv], numden[..., Dv]                            # (G, Nq, Dv), (G, Nq)
    out = num / xp.where(den > 0, den, 1)[..., None]                        # (G, Nq, Dv); den = 0 -> 0
    res["den"] = den
    return out, res


def _slots(x, n_c, chunk, i_first, p_first, n_valid, xp=np):
    """Query rows (G, Nq, F) placed at their positions, cut into chunks (G, n_c, C, F)."""
    G, _, F = x.shape
    slots = xp.zeros((G, n_c * chunk, F), dtype=x.dtype)                    # (G, L, F)
    slots[:, p_first : p_first + n_valid] = x[:, i_first:]
    return slots.reshape(G, n_c, chunk, F)


def _unslot(x, Nq, i_first, p_first, n_valid, xp=np):
    """Inverse of :func:`_slots`: (G, n_c, C, F) back to query rows (G, Nq, F); rows before i_first are 0."""
    G, F = x.shape[0], x.shape[-1]
    flat = x.reshape(G, -1, F)                                              # (G, L, F)
    rows = xp.zeros((G, Nq, F), dtype=x.dtype)                              # (G, Nq, F)
    rows[:, i_first:] = flat[:, p_first : p_first + n_valid]
    return rows


def performer_backward(dout, out, res, omega, *, mask=None, offset=None, scale, variant="stable", eps=0.0,
                       Dv, xp=np, scan=exclusive_scan):
    """Gradients of FAVOR+, with the shifts held constant (exact: they cancel in the ratio).

    With ``g_i = dO_i / den_i``, ``h_i = -(dO_i . o_i) / den_i`` and
    ``dO'_i = [g_i, h_i]`` (0 on rows with ``den_i = 0``):

    - non-causal: ``dSigma = a^T dO'``, ``da = dO' Sigma^T``,
      ``db_j = beta_c dSigma vx_j``, ``dvx_j = beta_c dSigma^T b_j``;
    - causal: with ``Q_c = A_c^T dO'_c``, the reverse scan
      ``H_c = sum_(c' > c) exp(T_c - T_c') Q_c'`` (factors ``alpha``, at most 1)
      and the in-chunk products ``U = tril(dO'_c vx_c^T)``,
      ``W = tril(A_c b_c^T)``::

          da_c  = alpha_c dO'_c E_c^T + beta_c U b_c
          db_c  = beta_c (vx_c H_c^T + U^T A_c)
          dvx_c = beta_c (b_c H_c + W^T dO'_c)

    Then ``dlambda = df * (f - eps ratio)`` for every feature ``f`` and
    ``dx = sqrt(s) (dlambda Omega - rowsum(dlambda) x~)``. With ``eps > 0``
    the shifts no longer cancel; their gradients (through the arg-max
    entries) are added.

    Returns
    -------
    dq : array of shape (G, Nq, D)
    dk : array of shape (G, Nk, D)
    dv : array of shape (G, Nk, Dv)
    """
    a, b, vx, alpha, beta = res["a"], res["b"], res["vx"], res["alpha"], res["beta"]
    n_c, chunk, i_first, p_first, n_valid = res["layout"]
    G, Nq, m = a.shape
    Nk = res["kt"].shape[1]
    den = res["den"]                                                        # (G, Nq)
    inv = xp.where(den > 0, 1 / xp.where(den > 0, den, 1), 0)[..., None]   # (G, Nq, 1); 0 on rows that output 0
    h = -(dout * out).sum(axis=-1, keepdims=True) * inv                     # (G, Nq, 1)
    dO = xp.concatenate([dout * inv, h], axis=-1)                           # (G, Nq, Dv + 1)
    if offset is None:
        total = res["total"]                                                # (G, m, Dv + 1)
        dtotal = swap_last(a) @ dO                                          # (G, m, Dv + 1)
        da = dO @ swap_last(total)                                          # (G, Nq, m)
        db = beta[..., None, None] * (vx @ swap_last(dtotal)[:, None])      # (G, n_c, C, m)
        dvx = beta[..., None, None] * (b @ dtotal[:, None])                 # (G, n_c, C, Dv + 1)
    else:
        A = _slots(a, n_c, chunk, i_first, p_first, n_valid, xp)            # (G, n_c, C, m)
        dOs = _slots(dO, n_c, chunk, i_first, p_first, n_valid, xp)         # (G, n_c, C, Dv + 1)
        H = scan(swap_last(A) @ dOs, alpha, alpha, reverse=True, xp=xp)  # (G, n_c, m, Dv + 1)
        tril = _causal_tril(chunk, xp)                                      # (C, C)
        U = xp.where(tril, dOs @ swap_last(vx), 0)                          # (G, n_c, C, C)
        W = xp.where(tril, A @ swap_last(b), 0)                             # (G, n_c, C, C)
        al, be = alpha[..., None, None], beta[..., None, None]              # (G, n_c, 1, 1)
        dA = al * (dOs @ swap_last(res["E"])) + be * (U @ b)                # (G, n_c, C, m)
        da = _unslot(dA, Nq, i_first, p_first, n_valid, xp)                 # (G, Nq, m)
        db = be * (vx @ swap_last(H) + swap_last(U) @ A)                    # (G, n_c, C, m)
        dvx = be * (b @ H + swap_last(W) @ dOs)                             # (G, n_c, C, Dv + 1)
    floor = a.dtype.type(eps * feature_ratio(variant, m))                  # df/dlambda = f - floor
    b_keys = b.reshape(G, -1, m)[:, :Nk]                                    # (G, Nk, m)
    dlam_q = da * (a - floor)                                               # (G, Nq, m)
    dlam_k = xp.where(b_keys > 0, db.reshape(G, -1, m)[:, :Nk] * (b_keys - floor), 0)  # (G, Nk, m); masked: 0
    sqrt_s = math.sqrt(scale)
    dq = input_gradient(dlam_q, res["qt"], omega, sqrt_s)                   # (G, Nq, D)
    dk = input_gradient(dlam_k, res["kt"], omega, sqrt_s)                   # (G, Nk, D)
    if eps > 0 and variant == "stable":
        add_shift_gradients(dq, dk, dlam_q.sum(axis=-1), dlam_k.sum(axis=-1), a, b_keys, res["qt"], res["kt"],
                            omega, sqrt_s, xp)
    dv = dvx.reshape(G, -1, Dv + 1)[:, :Nk, :Dv]                           # (G, Nk, Dv)
    return dq, dk, xp.ascontiguousarray(dv)


def input_gradient(dlam, xt, omega, sqrt_s):
    """``dx = sqrt(s) (dlam Omega - rowsum(dlam) x~)``, the pullback of ``lambda(x)``."""
    return (dlam @ omega - dlam.sum(axis=-1, keepdims=True) * xt) * xt.dtype.type(sqrt_s)


def add_shift_gradients(dq, dk, dlam_q_sum, dlam_k_sum, a, b, qt, kt, omega, sqrt_s, xp=np):
    """In place: add the gradients of the shifts, which only ``eps > 0`` leaves uncancelled.

    A feature ``f = exp(lambda - c) + eps`` has ``df/dc = -(f - eps)``, so
    ``dc = -sum dlambda``. The shift ``c`` is the ``lambda`` entry of the
    largest feature (the arg max), so that entry receives ``dc``, which adds
    ``sqrt(s) dc (omega_r* - x~)`` to the input's gradient. Each query has its
    own shift; all keys share one, the max over kept keys.

    Parameters
    ----------
    dq, dk : arrays of shape (G, Nq, D), (G, Nk, D), updated in place
    dlam_q_sum, dlam_k_sum : arrays of shape (G, Nq), (G, Nk)
        Row sums of the feature-logit gradients without the shift terms.
    a, b : arrays of shape (G, Nq, m), (G, Nk, m), the features (masked keys 0)
    qt, kt : arrays of shape (G, Nq, D), (G, Nk, D), the scaled inputs
    omega : array of shape (G or 1, m, D)
    """
    G, Nk, m = b.shape
    s = qt.dtype.type(sqrt_s)
    omega = xp.broadcast_to(omega, (G, *omega.shape[1:]))                   # (G, m, D)
    r_star = xp.argmax(a, axis=-1)                                          # (G, Nq) each query's arg max
    omega_star = xp.take_along_axis(omega, r_star[..., None], axis=1)       # (G, Nq, D)
    dq += s * (-dlam_q_sum)[..., None] * (omega_star - qt)                  # (G, Nq, D)
    star = xp.argmax(b.reshape(G, Nk * m), axis=-1)                         # (G,) the keys' shared arg max
    j_star, r_star = star // m, star % m                                    # (G,), (G,)
    g = xp.arange(G)
    dM = -dlam_k_sum.sum(axis=-1)                                           # (G,)
    dk[g, j_star] += s * dM[:, None] * (omega[g, r_star] - kt[g, j_star])   # (G, D)


def forward(q, k, v, *, mask, offset, scale, features, num_features, orthogonal, feature_norms, variant, eps,
            chunk_size, xp=np, scan=exclusive_scan):
    """Backend entry point (the CuPy backend passes its array module and scan kernel)."""
    omega = xp.asarray(features).astype(q.dtype)                            # (G or 1, m, D)
    out, res = performer_reference(q, k, v, omega, mask=mask, offset=offset, scale=scale, variant=variant,
                                   eps=eps, chunk_size=chunk_size, xp=xp, scan=scan)
    res["features"] = features
    return out, res


def backward(dout, q, k, v, out, res, *, mask, offset, scale, features, num_features, orthogonal, feature_norms,
             variant, eps, chunk_size, xp=np, scan=exclusive_scan):
    """Backend entry point for the pullback."""
    omega = xp.asarray(features).astype(q.dtype)
    return performer_backward(dout, out, res, omega, mask=mask, offset=offset, scale=scale, variant=variant,
                              eps=eps, Dv=v.shape[2], xp=xp, scan=scan)
