"""One API over every method and backend.

:func:`attention` validates the inputs, resolves the method's parameters and
picks a backend (:mod:`eff_attn._dispatch`), draws the method's randomness on
the host (``Method.draw``, from the shapes alone), fits its data-dependent
state when it has one (``Method.fit``, from the values of the inputs), runs the backend's ``forward`` and then the method's ``finish``
(``Method.finish``), and returns the output in the caller's framework.
:func:`attention_vjp` does the same and also returns the pullback, built on
the backend's ``backward``.

A backend module has two functions with one signature on every backend::

    forward(q, k, v, *, mask, offset, scale, **params) -> (out, res)
    backward(dout, q, k, v, out, res, *, mask, offset, scale, **params) -> (dq, dk, dv)

with ``q (G, Nq, D)``, ``k (G, Nk, D)``, ``v (G, Nk, Dv)``, ``mask (G, Nk)``
or None, ``offset`` the causal offset or None, and ``res`` a dict of saved
quantities (the logsumexp, codes, supports) that also feeds ``info``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import _backend, interop, masks
from ._dispatch import AUTO_NUMBA_MIN_PAIRS, resolve_params, select_impl
from ._validate import Problem, check_inputs, value_rescale
from .registry import Impl, Method, get_method, scalar_params

__all__ = ["attention", "attention_vjp", "backends", "prepare", "AUTO_NUMBA_MIN_PAIRS"]


@dataclass(frozen=True)
class Call:
    """A validated, dispatched call: everything a backend needs.

    ``v_scale`` is the power of two ``c`` that ``problem.v`` was divided by
    (:func:`eff_attn._validate.value_rescale`). A method's output is
    homogeneous of degree ``d = value_degree`` in ``v`` (``d = 1`` for
    ``out = A(q, k) v``), so :meth:`run_forward` multiplies the backend's
    output by ``c**d``, and :meth:`run_backward` multiplies ``dq`` and ``dk``
    by ``c**d`` and ``dv`` by ``c**(d - 1)``. An empty batch (``G = 0``) runs no backend: the results are
    empty arrays.
    """

    method: Method
    impl: Impl
    problem: Problem
    params: dict
    kwargs: dict
    v_scale: float = 1.0
    value_degree: int = 1

    @property
    def out_scale(self) -> float:
        return self.v_scale ** self.value_degree

    def run_forward(self):
        p = self.problem
        if p.G == 0:
            res = {"empty_rows": p.xp.zeros((0, p.Nq), dtype=bool), "flops": 0}
            return p.xp.zeros((0, p.Nq, p.Dv), dtype=p.q.dtype), res
        out, res = self.impl.load().forward(
            p.q, p.k, p.v, mask=p.mask, offset=p.offset, scale=p.scale, **self.kwargs
        )
        if self.method.finish is not None:
            res = self.method.finish(p, self.kwargs, out, res)
        return (out, res) if self.out_scale == 1 else (out * self.out_scale, res)

    def run_backward(self, dout, out, res):
        p = self.problem
        if p.G == 0:
            return p.xp.zeros_like(p.q), p.xp.zeros_like(p.k), p.xp.zeros_like(p.v)
        c, s = self.v_scale, self.out_scale
        dq, dk, dv = self.impl.load().backward(
            dout, p.q, p.k, p.v, out if s == 1 else out / s, res, mask=p.mask, offset=p.offset, scale=p.scale,
            **self.kwargs
        )
        return (dq, dk, dv) if c == 1 else (dq * s, dk * s, dv * (s / c))


def backends() -> dict[str, dict]:
    """Which backends can run here, and why not.

    Returns
    -------
    dict
        ``{"numpy": {"available": True, "reason": ...}, "numba": ..., "cupy": ...}``.
        Nothing heavy is imported except CuPy, and only if it is installed.
    """
    return _backend.backend_report()


def prepare(q, k, v, *, method="exact", backend="auto", mask=None, causal=False, scale=None,
            rng=None, check_finite=True, need_grad=False, **params) -> Call:
    """Validate, resolve, dispatch, draw and fit, without running anything.

    This is the first half of :func:`attention`; the benchmark runner uses it
    to time the backend call alone.
    """
    problem = check_inputs(q, k, v, mask=mask, causal=causal, scale=scale, check_finite=check_finite)
    v_scale = value_rescale(problem.v)
    if v_scale != 1:  # max |v| near the dtype's range: run on v / 2**e, exactly (see Call)
        problem = replace(problem, v=problem.v / problem.v.dtype.type(v_scale))
    m = get_method(method)
    resolved = resolve_params(m, problem, params)
    degree = m.value_degree(resolved) if callable(m.value_degree) else m.value_degree
    impl = select_impl(m, backend, problem, resolved, need_grad)
    kwargs = m.draw_and_fit(rng, problem, resolved) if problem.G > 0 else dict(resolved)
    return Call(method=m, impl=impl, problem=problem, params=resolved, kwargs=kwargs,
                v_scale=v_scale, value_degree=degree)


def build_info(call: Call, res: dict) -> dict:
    """The ``info`` dict of a call: the base keys plus the method's own."""
    p = call.problem
    m = call.method
    extra = m.info(p, call.params, res) if m.info is not None and p.G > 0 else {}
    if "empty_rows" in res:
        empty = res["empty_rows"]
    else:
        empty = masks.empty_rows(p.mask, p.offset, p.Nq, p.Nk, p.xp)
        empty = p.xp.broadcast_to(empty, (p.G, p.Nq))
    flops = res.get("flops")
    if flops is None:
        causal = masks.causal_argument(p.offset, p.Nq, p.Nk)
        flops = m.flops(p.Nq, p.Nk, p.D, p.Dv, batch=p.G, causal=causal, **scalar_params(call.params))
    return {
        "method": m.name,
        "backend": call.impl.backend,
        "params": scalar_params(call.params),
        "flops": int(flops),
        "empty_rows": p.unflatten(empty),
        **extra,
    }


def attention(q, k, v, *, method="exact", backend="auto", mask=None, causal=False, scale=None,
              rng=None, return_info=False, check_finite=True, **params):
    """Attention of queries ``q`` over keys ``k`` and values ``v``, by any method.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
        NumPy, CuPy, torch or JAX; the leading axes broadcast against k and v.
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    method : str, default="exact"
        A registered method name (see :func:`eff_attn.registry.method_names`).
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
        ``"auto"`` uses CuPy for GPU arrays, and Numba for host arrays when it
        is installed and the problem is large enough to repay compilation.
        An explicit backend that cannot run raises :class:`NotSupportedError`.
    mask : bool array of shape (..., Nk), optional
        Key keep-mask: True means the key may be attended.
    causal : bool, "bottom_right" or "top_left", default=False
        ``True`` is bottom-right aligned (queries are the last Nq positions).
    scale : float, optional
        Score scale, default ``1/sqrt(D)``.
    rng : None, int or numpy.random.Generator
        Randomness of randomised methods, drawn on the host. ``None`` draws
        afresh on every call; deterministic methods ignore it.
    return_info : bool, default=False
        Also return a dict of diagnostics (``method``, ``backend``,
        ``params``, ``flops``, ``empty_rows`` and the method's own keys).
    check_finite : bool, default=True
        Raise on NaN/inf in q and in the kept rows of k and v.
    **params
        The method's own parameters (its docs page lists them).

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        In the caller's framework, on the caller's device, in the input dtype.
        Rows that see no key are 0. An empty batch (a leading axis of size 0)
        gives an empty output for every method, with the base ``info`` keys
        only (``flops`` 0); the parameters are still checked.
    info : dict
        Only with ``return_info=True``.

    Notes
    -----
    Every method's output is linear in ``v`` (or, for row-normalised
    outputs, independent of its scale). When ``max |v|`` is near the top of
    the dtype's range (above ``2**64`` in float32), the call runs on
    ``v / 2**e`` and multiplies the output by ``2**e`` (``2**(e d)`` for a
    method of degree ``d`` in ``v``), which is exact, so intermediate sums
    over keys cannot overflow where the output itself is representable.
    """
    call = prepare(q, k, v, method=method, backend=backend, mask=mask, causal=causal, scale=scale,
                   rng=rng, check_finite=check_finite, **params)
    out, res = call.run_forward()
    result = interop.from_kernel_array(call.problem.unflatten(out), call.problem.framework)
    return (result, build_info(call, res)) if return_info else result


def _version(x):
    """A torch tensor's in-place version counter; None where it has none (inference-mode tensors)."""
    try:
        return x._version
    except RuntimeError:
        return None


def _versions(named: dict) -> dict:
    """``name -> (tensor, version)`` for the torch inputs that track in-place edits."""
    torch_inputs = {name: x for name, x in named.items() if interop.framework_of(x) == "torch"}
    versions = {name: (x, _version(x)) for name, x in torch_inputs.items()}
    return {name: pair for name, pair in versions.items() if pair[1] is not None}


def attention_vjp(q, k, v, *, method="exact", backend="auto", mask=None, causal=False, scale=None,
                  rng=None, return_info=False, check_finite=True, **params):
    """Forward pass plus its pullback (vector-Jacobian product).

    Takes the arguments of :func:`attention`, and picks only backends that
    have a backward pass.

    Returns
    -------
    out : array of shape (..., Nq, Dv)
    vjp : callable
        ``vjp(dout) -> (dq, dk, dv)`` with ``dout`` of the shape of ``out``;
        the gradients have the shapes of q, k and v as given (summed over
        broadcast axes). Randomised methods replay the forward's draws.
    info : dict
        Only with ``return_info=True``.

    Notes
    -----
    Like the tensors torch saves for backward, ``q``, ``k`` and ``v`` are
    held **by reference** (NumPy and CuPy inputs are not copied, which would
    double their memory): the pullback reads them again when it is called.
    Do not modify them in place between the forward pass and
    ``vjp(dout)``. If you do, the gradients of NumPy or CuPy inputs are
    undefined: they mix the forward's saved quantities (the logsumexp, the
    routing) with the new values, and no error is raised. For torch inputs
    the pullback checks each tensor's version counter and raises
    ``RuntimeError`` naming the modified argument, as torch's autograd
    does. JAX arrays are immutable. The returned gradients are new arrays:
    editing the inputs after ``vjp`` returned does not change them.
    """
    call = prepare(q, k, v, method=method, backend=backend, mask=mask, causal=causal, scale=scale,
                   rng=rng, check_finite=check_finite, need_grad=True, **params)
    out, res = call.run_forward()
    p = call.problem
    out_shape = (*p.batch_shape, p.Nq, p.Dv)
    versions = _versions({"q": q, "k": k, "v": v})

    def vjp(dout):
        for name, (x, version) in versions.items():
            if x._version != version:
                raise RuntimeError(
                    f"{name} was modified in place after the forward pass (torch version {version} -> "
                    f"{x._version}); the pullback would use the new values. Clone it before editing."
                )
        d, framework, _ = interop.to_kernel_array(dout, "dout")
        if tuple(d.shape) != out_shape:
            raise ValueError(f"dout must have the output's shape {out_shape}, got {tuple(d.shape)}")
        if framework != p.framework:
            raise TypeError(f"dout is a {framework} array but the inputs were {p.framework}")
        d = p.xp.ascontiguousarray(d.reshape(p.G, p.Nq, p.Dv).astype(p.q.dtype, copy=False))
        grads = call.run_backward(d, out, res)
        return tuple(
            interop.from_kernel_array(p.reduce_grad(g, name), p.framework)
            for g, name in zip(grads, ("q", "k", "v"))
        )

    result = interop.from_kernel_array(p.unflatten(out), p.framework)
    return (result, vjp, build_info(call, res)) if return_info else (result, vjp)

