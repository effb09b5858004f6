"""The functions the workers run: prepare a call, run one part, run a whole call.

Each takes plain arrays (NumPy on CPU workers, CuPy on GPU workers) and the
method's :class:`~eff_attn.registry.Method` record itself, so a method
registered at run time needs no registry on the workers. Nothing here imports
dask.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .._dispatch import resolve_params, select_impl
from .._validate import check_inputs
from ..interop import array_module
from ..registry import Impl, Method
from .parts import Part, check_declared, take_part

__all__ = ["Prepared", "prepare", "prepare_on_data", "run_part", "run_whole", "no_visible_keys"]


@dataclass(frozen=True)
class Prepared:
    """A resolved, dispatched, drawn and fitted call.

    Attributes
    ----------
    impl : Impl
        The backend that runs every part.
    kwargs : dict
        The backend's keyword arguments: resolved parameters, draws and fitted state.
    whole : bool
        True when ``kwargs`` are the whole call's (each task cuts its part);
        False when they are already one task's part.
    """

    impl: Impl
    kwargs: dict
    whole: bool = True


def prepare(method: Method, problem, *, backend: str, rng, params: dict, resolved: dict | None = None) -> Prepared:
    """Resolve the parameters, pick the backend, draw and fit, once, for the whole ``problem``.

    The same steps as :func:`eff_attn.api.prepare`, with the same errors,
    so at one seed the draws and the fitted state equal the single-machine
    call's. ``resolved``: the parameters already resolved for ``problem``.
    """
    if resolved is None:
        resolved = resolve_params(method, problem, params)
    impl = select_impl(method, backend, problem, resolved, need_grad=False)
    return Prepared(impl, method.draw_and_fit(rng, problem, resolved))


def prepare_on_data(q, k, v, mask, *, method: Method, backend, causal, scale, rng, check_finite,
                    params) -> Prepared:
    """:func:`prepare` in a task that sees the whole inputs (``Sharding.reads_data``, or a call that fits)."""
    problem = check_inputs(q, k, v, mask=mask, causal=causal, scale=scale, check_finite=check_finite)
    prepared = prepare(method, problem, backend=backend, rng=rng, params=params)
    check_declared(method, prepared.kwargs)
    return prepared


def run_part(q, k, v, mask, prepared: Prepared, part: Part, *, method: Method, G: int, offset, scale: float,
             check_finite: bool, with_lse: bool):
    """One task: the method's forward on one block of slices, queries and keys.

    Parameters
    ----------
    q : array of shape (*lead, nq, D)
        The task's block; k, v and mask alike, with the same ``lead``.
    prepared : Prepared
    part : Part
        Where the block sits in the whole call.
    G : int
        Slices of the whole call.
    offset : int or None
        The causal offset of this block: query ``i`` of the block sees key
        ``j`` of the block when ``j <= i + offset``.
    with_lse : bool
        Also return the rows' log-normaliser (``Sharding.key_blocks``).

    Returns
    -------
    out : array of shape (*lead, nq, Dv)
    lse : array of shape (*lead, nq), only with ``with_lse``
    """
    problem = replace(check_inputs(q, k, v, mask=mask, scale=scale, check_finite=check_finite), offset=offset)
    kwargs = take_part(method.sharding, prepared.kwargs, part, G) if prepared.whole else prepared.kwargs
    p = problem
    out, res = prepared.impl.load().forward(p.q, p.k, p.v, mask=p.mask, offset=offset, scale=p.scale, **kwargs)
    out = p.unflatten(out)
    if not with_lse:
        return out
    return out, p.unflatten(method.sharding.key_blocks(p, kwargs, res))


def run_whole(q, k, v, mask, *, method: Method, backend, causal, scale, rng, check_finite, params):
    """The whole call in one task: the fallback for a method without a ``Sharding``."""
    problem = check_inputs(q, k, v, mask=mask, causal=causal, scale=scale, check_finite=check_finite)
    prepared = prepare(method, problem, backend=backend, rng=rng, params=params)
    p = problem
    out, _ = prepared.impl.load().forward(p.q, p.k, p.v, mask=p.mask, offset=p.offset, scale=p.scale,
                                          **prepared.kwargs)
    return p.unflatten(out)


def no_visible_keys(shape, like):
    """Zeros of ``shape`` like ``like``: the output of a query block whose keys all lie in its future."""
    return array_module(like).zeros(shape, dtype=like.dtype)
