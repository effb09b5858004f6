"""The public sparse transforms: sparsemax, entmax15 and entmax_bisect, with pullbacks.

Each maps the vectors along one axis (the last by default) onto the
probability simplex::

    p = sparsemax(z)                     alpha = 2, exact sort
    p = entmax15(z)                      alpha = 1.5, exact sort
    p = entmax_bisect(z, alpha=1.3)      any alpha >= 1, bisection (alpha = 1: softmax)
    p, vjp = sparsemax_vjp(z);  dz = vjp(dp)
    p, vjp = entmax_bisect_vjp(z, alpha);  dz, dalpha = vjp(dp)

They dispatch like :func:`eff_attn.attention`: NumPy and CuPy arrays (and torch
or JAX tensors through DLPack) in, the same framework out; ``backend="auto"``
picks CuPy for GPU arrays, Numba for large host arrays and NumPy otherwise.
Every backend module of ``entmax`` has ``rows_forward``, ``rows_backward`` and
``rows_alpha_grad`` over flat ``(R, n)`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ... import interop
from ..._array import to_host
from ..._dispatch import select_impl
from ..._entmax import check_alpha_array
from ..._validate import _floating_dtype, check_bool, check_float, check_int
from ...registry import Impl, Method

#: Bisection steps before the closed-form polish where a backend finds the
#: sort result by bisection (CuPy); the sort itself needs none.
_SORT_N_ITER = 50

__all__ = [
    "sparsemax",
    "entmax15",
    "entmax_bisect",
    "sparsemax_vjp",
    "entmax15_vjp",
    "entmax_bisect_vjp",
]


@dataclass(frozen=True)
class Rows:
    """Validated transform input, flattened to rows ``(R, n)`` along the chosen axis.

    Doubles as the ``problem`` of the dispatcher (device, dtype, mask, sizes).
    """

    z: object
    mask: object
    alpha: object
    alpha_shape: tuple | None
    moved_shape: tuple
    axis: int
    framework: str
    device: str
    causal: bool = False

    @property
    def xp(self):
        return interop.array_module(self.z)

    @property
    def dtype_name(self) -> str:
        return str(self.z.dtype)

    @property
    def G(self) -> int:
        return self.z.shape[0]

    @property
    def Nq(self) -> int:
        return 1

    @property
    def Nk(self) -> int:
        return self.z.shape[1]

    @property
    def row_shape(self) -> tuple:
        return self.moved_shape[:-1]

    def to_user(self, p):
        """Rows (R, n) back to the caller's layout and framework."""
        p = self.xp.moveaxis(p.reshape(self.moved_shape), -1, self.axis)
        return interop.from_kernel_array(p, self.framework)

    def from_user(self, a, name: str):
        """An array of z's shape, as contiguous rows (R, n) in z's dtype."""
        a, framework, _ = interop.to_kernel_array(a, name)
        if framework != self.framework:
            raise TypeError(f"{name} is a {framework} array but z is {self.framework}")
        shape = tuple(np.moveaxis(np.empty(self.moved_shape, dtype=bool), -1, self.axis).shape)
        if tuple(a.shape) != shape:
            raise ValueError(f"{name} must have z's shape {shape}, got {tuple(a.shape)}")
        a = self.xp.moveaxis(a, self.axis, -1).reshape(self.z.shape)
        return self.xp.ascontiguousarray(a.astype(self.z.dtype, copy=False))

    def reduce_alpha(self, dalpha_rows):
        """Per-row alpha derivatives (R,) summed to the shape alpha was given in."""
        d = np.asarray(to_host(dalpha_rows), dtype=np.float64)
        d = d.reshape(self.row_shape)
        if self.alpha_shape is None:
            return float(d.sum())
        extra = d.ndim - len(self.alpha_shape)
        axes = tuple(range(extra)) + tuple(
            extra + i for i, n in enumerate(self.alpha_shape) if n == 1 and d.shape[extra + i] != 1
        )
        return d.sum(axis=axes, keepdims=True).reshape(self.alpha_shape) if axes else d


def _rows(z, mask, axis, alpha, *, alpha_minimum_open, check_finite) -> Rows:
    z, framework, device = interop.to_kernel_array(z, "z")
    _floating_dtype("z", z)
    if z.ndim < 1:
        raise ValueError("z must have at least one axis")
    axis = check_int("axis", axis)
    if not -z.ndim <= axis < z.ndim:
        raise ValueError(f"axis={axis} is out of range for z with {z.ndim} axes")
    axis %= z.ndim
    if z.shape[axis] < 1:
        raise ValueError(f"z has no entries along axis {axis} (shape {tuple(z.shape)})")
    xp = interop.array_module(z)
    moved = xp.moveaxis(z, axis, -1)
    moved_shape = tuple(moved.shape)
    n = moved_shape[-1]
    R = math.prod(moved_shape[:-1])
    rows = xp.ascontiguousarray(moved.reshape(R, n))
    keep = None
    if mask is not None:
        keep, mask_framework, _ = interop.to_kernel_array(mask, "mask")
        if mask_framework != framework:
            raise TypeError(f"mask is a {mask_framework} array but z is {framework}")
        if str(keep.dtype) != "bool":
            raise TypeError(f"mask must be a boolean keep-mask (True = keep), got dtype {keep.dtype}")
        try:
            keep = xp.broadcast_to(keep, z.shape)
        except ValueError:
            raise ValueError(f"mask of shape {tuple(keep.shape)} does not broadcast to z's shape "
                             f"{tuple(z.shape)}") from None
        keep = xp.ascontiguousarray(xp.moveaxis(keep, axis, -1).reshape(R, n))
    alpha_shape = None
    if isinstance(alpha, np.ndarray) and alpha.ndim == 0:
        alpha = alpha.item()
    if np.ndim(alpha) == 0:
        alpha = check_float("alpha", alpha, minimum=1.0, open_min=alpha_minimum_open)
    else:
        host = to_host(alpha)
        alpha_shape = tuple(np.shape(host))
        alpha = check_alpha_array(host, moved_shape[:-1], open_min=alpha_minimum_open,
                                  what="z's shape without axis").reshape(R)
    if check_finite:
        finite = xp.isfinite(rows) if keep is None else (xp.isfinite(rows) | ~keep)
        if not bool(finite.all()):
            raise ValueError("z contains NaN or inf in a kept entry; mask it out with mask= or pass check_finite=False")
    return Rows(z=rows, mask=keep, alpha=alpha, alpha_shape=alpha_shape, moved_shape=moved_shape, axis=axis,
                framework=framework, device=device)


def _no_params(problem, **params):
    return params


def _transform_flops(*args, **kwargs):
    return 0


#: The transforms' backends, for the dispatcher (not an attention method).
TRANSFORMS = Method(
    name="entmax transform",
    summary="sparsemax / entmax15 / entmax_bisect over the last axis",
    resolve=_no_params,
    flops=_transform_flops,
    impls=(
        Impl("numpy", "eff_attn.methods.entmax.reference"),
        Impl("numba", "eff_attn.methods.entmax.numba"),
        Impl("cupy", "eff_attn.methods.entmax.cupy"),
    ),
)


def _run(name, z, *, mask, axis, alpha, algorithm, n_iter, ensure_sum_one, backend, return_info, check_finite,
         with_vjp, alpha_grad):
    check_finite = check_bool("check_finite", check_finite)
    rows = _rows(z, mask, axis, alpha, alpha_minimum_open=alpha_grad, check_finite=check_finite)
    n_iter = check_int("n_iter", n_iter, minimum=1)
    ensure_sum_one = check_bool("ensure_sum_one", ensure_sum_one)
    check_bool("return_info", return_info)
    if algorithm == "bisect" and rows.alpha_shape is None and rows.alpha == 1:
        algorithm = "softmax"
    impl = select_impl(TRANSFORMS, backend, rows, {}, with_vjp)
    module = impl.load()
    p, tau, support = module.rows_forward(rows.z, rows.mask, rows.alpha, algorithm=algorithm, n_iter=n_iter,
                                          ensure_sum_one=ensure_sum_one)
    result = rows.to_user(p)
    info = {
        "transform": name,
        "backend": impl.backend,
        "algorithm": algorithm,
        "tau": interop.from_kernel_array(tau.reshape(rows.row_shape), rows.framework),
        "support_size": interop.from_kernel_array(support.reshape(rows.row_shape), rows.framework),
    }
    if not with_vjp:
        return (result, info) if return_info else result

    def vjp(dp):
        g = rows.from_user(dp, "dp")
        dz = rows.to_user(module.rows_backward(p, g, rows.alpha))
        if not alpha_grad:
            return dz
        return dz, rows.reduce_alpha(module.rows_alpha_grad(p, g, rows.alpha))

    return (result, vjp, info) if return_info else (result, vjp)


def sparsemax(z, *, mask=None, axis=-1, backend="auto", return_info=False, check_finite=True):
    """Sparsemax: the Euclidean projection of ``z`` onto the probability simplex.

    ``p = [z - tau]_+`` with ``tau`` such that ``sum p = 1`` (alpha-entmax at
    alpha = 2), found exactly by sorting. Time ``O(n log n)`` per vector.

    Parameters
    ----------
    z : array of shape (..., n)
        NumPy, CuPy, torch or JAX; float32 or float64.
    mask : bool array broadcastable to z's shape, optional
        Keep-mask: False entries get exactly 0 and do not count.
    axis : int, default=-1
        The axis that sums to one.
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
        ``"auto"``: CuPy for GPU arrays; Numba for host arrays of at least
        ``2**20`` entries when it is installed; NumPy otherwise.
    return_info : bool, default=False
        Also return ``info`` with ``tau`` and ``support_size`` (z's shape
        without ``axis``), ``backend`` and ``algorithm``. ``tau`` is unshifted:
        ``p = [(alpha - 1) z - tau]_+ ** (1 / (alpha - 1))`` (``exp(z - tau)``
        at alpha = 1), ``+inf`` on rows with nothing kept.
    check_finite : bool, default=True
        Raise ``ValueError`` on NaN or inf in a kept entry.

    Returns
    -------
    p : array of z's shape and dtype
        Rows with nothing kept are 0.
    info : dict, only if ``return_info``
    """
    return _run("sparsemax", z, mask=mask, axis=axis, alpha=2.0, algorithm="sort", n_iter=_SORT_N_ITER,
                ensure_sum_one=False, backend=backend, return_info=return_info,
                check_finite=check_finite, with_vjp=False, alpha_grad=False)


def entmax15(z, *, mask=None, axis=-1, backend="auto", return_info=False, check_finite=True):
    """1.5-entmax: ``p = [z / 2 - tau]_+ ** 2`` with ``sum p = 1``, exact by sorting.

    Sparse like sparsemax, smoother near ties. Time ``O(n log n)`` per vector.

    Parameters
    ----------
    z : array of shape (..., n)
    mask, axis, backend, return_info, check_finite
        As in :func:`sparsemax`.

    Returns
    -------
    p : array of z's shape and dtype
    info : dict, only if ``return_info``
    """
    return _run("entmax15", z, mask=mask, axis=axis, alpha=1.5, algorithm="sort", n_iter=_SORT_N_ITER,
                ensure_sum_one=False, backend=backend, return_info=return_info,
                check_finite=check_finite, with_vjp=False, alpha_grad=False)


def entmax_bisect(z, alpha=1.5, *, n_iter=50, ensure_sum_one=True, mask=None, axis=-1, backend="auto",
                  return_info=False, check_finite=True):
    """alpha-entmax for any ``alpha >= 1``, by bisection on the threshold.

    ``p = [(alpha - 1) z - tau]_+ ** (1 / (alpha - 1))`` with ``sum p = 1``;
    alpha = 1 is softmax, 2 is sparsemax. The bracket
    ``-1 <= tau <= -n ** (1 - alpha)`` (in units shifted by the row max) is
    halved ``n_iter`` times; the output is taken at its lower end, so its sum
    is at least 1 and its support contains the true one. Time
    ``O(n_iter n)`` per vector.

    Parameters
    ----------
    z : array of shape (..., n)
    alpha : float or array, default=1.5
        ``alpha >= 1``; an array broadcastable to z's shape without ``axis``
        gives each vector its own alpha.
    n_iter : int, default=50
        Bisection steps (the bracket ends below ``2**-50``).
    ensure_sum_one : bool, default=True
        Divide the output by its sum.
    mask, axis, backend, return_info, check_finite
        As in :func:`sparsemax`.

    Returns
    -------
    p : array of z's shape and dtype
    info : dict, only if ``return_info``
    """
    return _run("entmax_bisect", z, mask=mask, axis=axis, alpha=alpha, algorithm="bisect", n_iter=n_iter,
                ensure_sum_one=ensure_sum_one, backend=backend, return_info=return_info,
                check_finite=check_finite, with_vjp=False, alpha_grad=False)


def sparsemax_vjp(z, *, mask=None, axis=-1, backend="auto", return_info=False, check_finite=True):
    """:func:`sparsemax` and its pullback.

    ``vjp(dp) = dp - mean_S(dp)`` on the support ``S``, 0 off it.

    Parameters
    ----------
    z : array of shape (..., n)
    mask, axis, backend, return_info, check_finite
        As in :func:`sparsemax`.

    Returns
    -------
    p : array of z's shape
    vjp : callable
        ``vjp(dp) -> dz``, ``dp`` and ``dz`` of z's shape.
    info : dict, only if ``return_info``
    """
    return _run("sparsemax", z, mask=mask, axis=axis, alpha=2.0, algorithm="sort", n_iter=_SORT_N_ITER,
                ensure_sum_one=False, backend=backend, return_info=return_info,
                check_finite=check_finite, with_vjp=True, alpha_grad=False)


def entmax15_vjp(z, *, mask=None, axis=-1, backend="auto", return_info=False, check_finite=True):
    """:func:`entmax15` and its pullback.

    ``vjp(g) = u g - u <u, g> / sum(u)`` with ``u = sqrt(p)``.

    Parameters
    ----------
    z : array of shape (..., n)
    mask, axis, backend, return_info, check_finite
        As in :func:`sparsemax`.

    Returns
    -------
    p : array of z's shape
    vjp : callable
        ``vjp(dp) -> dz``.
    info : dict, only if ``return_info``
    """
    return _run("entmax15", z, mask=mask, axis=axis, alpha=1.5, algorithm="sort", n_iter=_SORT_N_ITER,
                ensure_sum_one=False, backend=backend, return_info=return_info,
                check_finite=check_finite, with_vjp=True, alpha_grad=False)


def entmax_bisect_vjp(z, alpha=1.5, *, n_iter=50, ensure_sum_one=True, mask=None, axis=-1, backend="auto",
                      return_info=False, check_finite=True):
    """:func:`entmax_bisect` and its pullback to ``z`` and to ``alpha``.

    ``dz = u g - u <u, g> / sum(u)`` with ``u = p ** (2 - alpha)`` on the
    support; ``dalpha = sum_j g_j [(p_j - p~_j) / (alpha - 1)**2 -
    (h_j - p~_j sum h) / (alpha - 1)]`` with ``p~ = u / sum(u)`` and
    ``h = p log p``, summed over the vectors that share an alpha.

    Parameters
    ----------
    z : array of shape (..., n)
    alpha : float or array, default=1.5
        ``alpha > 1`` (``ValueError`` otherwise; use softmax's own gradient
        at 1).
    n_iter, ensure_sum_one
        As in :func:`entmax_bisect`.
    mask, axis, backend, return_info, check_finite
        As in :func:`sparsemax`.

    Returns
    -------
    p : array of z's shape
    vjp : callable
        ``vjp(dp) -> (dz, dalpha)``; ``dalpha`` has alpha's shape (a float
        for a scalar alpha).
    info : dict, only if ``return_info``
    """
    return _run("entmax_bisect", z, mask=mask, axis=axis, alpha=alpha, algorithm="bisect", n_iter=n_iter,
                ensure_sum_one=ensure_sum_one, backend=backend, return_info=return_info,
                check_finite=check_finite, with_vjp=True, alpha_grad=True)
