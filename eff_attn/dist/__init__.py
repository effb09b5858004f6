"""Attention beyond one machine: Dask tasks over batch, heads, queries and key blocks.

::

    import dask.array as da
    from dask.distributed import Client, LocalCluster
    import eff_attn.dist

    client = Client(LocalCluster(n_workers=2, threads_per_worker=1))
    q = da.from_array(q_host, chunks=(1, 2, 1024, 64))      # (B, H, N, D): per batch, 2 heads, 1024 queries
    k = da.from_array(k_host, chunks=(1, 2, 1024, 64))      # key blocks of 1024
    v = da.from_array(v_host, chunks=(1, 2, 1024, 64))
    out = eff_attn.dist.attention(q, k, v, method="exact", causal=True)   # a lazy dask array
    out = out.compute()                                      # or client.compute(out, retries=2)

The call is split into tasks as the method's :class:`~eff_attn.registry.Sharding`
declares: one task per block of the leading (batch, head) axes for every method;
query blocks where each query is independent given all keys; and, for ``exact``
and ``uniform``, key blocks merged exactly by a tree of online-softmax merges
(:mod:`eff_attn.dist.merge`). Parameters are resolved and random draws made once,
for the whole problem, so the result equals the single-machine
:func:`eff_attn.attention` at the same seed. Dask schedules, moves data and
retries; this module only builds the task graph.

Importing :mod:`eff_attn` does not import this module or dask; ``import
eff_attn.dist`` needs the ``dist`` extra (``pip install 'eff_attn[dist]'``).
See ``docs/distributed.md``.
"""

from __future__ import annotations

import itertools
import uuid
import warnings
from dataclasses import replace

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("eff_attn.dist needs dask: pip install 'eff_attn[dist]'") from exc

from .._dispatch import resolve_params
from .._validate import check_inputs, check_int
from ..interop import array_module
from ..masks import causal_offset
from ..registry import NotSupportedError, get_method
from .merge import merge_partials, merged_output
from .parts import Part, check_declared, take_part
from .tasks import Prepared, prepare, prepare_on_data, no_visible_keys, run_part, run_whole

__all__ = ["attention", "DEFAULT_SPLIT_EVERY"]

#: Partials merged per task of the key-block reduction tree.
DEFAULT_SPLIT_EVERY = 4


def attention(q, k, v, *, method="exact", backend="auto", mask=None, causal=False, scale=None, rng=None,
              check_finite=True, split_every=DEFAULT_SPLIT_EVERY, **params):
    """Attention as a graph of Dask tasks; the result equals :func:`eff_attn.attention`.

    The inputs are dask arrays chunked over the leading axes and/or the
    sequence axes (NumPy or CuPy arrays are taken as one chunk). Every
    method runs one task per block of the leading axes. Query-axis chunks
    of ``q`` are kept where the method declares its queries independent,
    and key-axis chunks of ``k`` become key blocks where it declares a
    key-block merge (``exact``, ``uniform``); otherwise those axes are
    rechunked to one chunk. The feature axes are always one chunk. Under
    ``causal``, a key block wholly in a query block's future gets no task.

    Cost: the method's own cost, spread over the tasks; with ``Pq`` query
    blocks and ``Pk`` key blocks, each query block is sent to ``Pk`` tasks,
    each key block to ``Pq`` tasks (about half under causal), and each row
    of partials ``(Dv + 1)`` numbers climbs a tree of
    ``ceil(log_split_every Pk)`` merges.

    Parameters
    ----------
    q : dask array of shape (..., Nq, D)
        The leading axes broadcast against k, v and mask, as in
        :func:`eff_attn.attention`. Chunks of NumPy arrays run on the
        ``numpy``/``numba`` backends, chunks of CuPy arrays on ``cupy``.
    k : dask array of shape (..., Nk, D)
    v : dask array of shape (..., Nk, Dv)
    method : str, default="exact"
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
        Chosen once, for the whole problem, as the single-machine call
        would choose it.
    mask : bool dask array of shape (..., Nk), optional
        Key keep-mask; rechunked to the key blocks.
    causal : bool, "bottom_right" or "top_left", default=False
    scale : float, optional
        Default ``1/sqrt(D)``.
    rng : None, int or numpy.random.Generator
        Drawn once, for the whole problem: on the client, or for a call
        that fits a state to the data (``Method.fit``) or whose ``resolve``
        reads it (``Sharding.reads_data``), in one task that sees all of it
        (a Generator is then copied into that task and not advanced here).
    check_finite : bool, default=True
        Checked in each task, when the graph runs.
    split_every : int, default=4
        Partials merged per task of the key-block reduction tree (>= 2).
    **params
        The method's own parameters, as in :func:`eff_attn.attention`.

    Returns
    -------
    out : dask array of shape (..., Nq, Dv)
        Lazy; chunked like ``q`` on the leading and query axes (like k, v
        or mask on a leading axis where q is broadcast), one chunk of
        ``Dv``. Compute it with ``.compute()`` or ``client.compute(out,
        retries=n)``.

    Raises
    ------
    NotSupportedError
        As :func:`eff_attn.attention` does, and for ``return_info`` (only the
        output is distributed) or for a method whose backend arguments its
        ``Sharding`` does not declare.
    """
    if "return_info" in params:
        raise NotSupportedError("eff_attn.dist.attention returns the output only; return_info is not supported")
    split_every = check_int("split_every", split_every, minimum=2)
    m = get_method(method)
    # 1. Validate on the client, as the single-machine call would, and choose the chunks.
    arrays = {name: _as_dask(x, name) for name, x in (("q", q), ("k", k), ("v", v), ("mask", mask))}
    meta = _meta_problem(arrays, causal=causal, scale=scale)
    q, k, v, mask = arrays["q"], arrays["k"], arrays["v"], arrays["mask"]
    lead_chunks = _lead_chunks(arrays, meta.batch_shape)
    like = array_module(meta.q).empty((0,) * (len(meta.batch_shape) + 2), dtype=meta.q.dtype)
    out_chunks = (*lead_chunks, q.chunks[-2], (meta.Dv,))

    if m.sharding is None:                                                   # undeclared: one task, whole call
        warnings.warn(f"method {m.name!r} declares no Method.sharding, so eff_attn.dist runs it as one task "
                      "(correct, not parallel)", UserWarning, stacklevel=2)
        whole = [_single_block(x) for x in (q, k, v, mask)]
        task = dask.delayed(run_whole, pure=False)(*whole, method=m, backend=backend, causal=causal, scale=scale,
                                                   rng=rng, check_finite=check_finite, params=params)
        out = da.from_delayed(task, shape=(*meta.batch_shape, meta.Nq, meta.Dv), dtype=meta.q.dtype, meta=like)
        return out.rechunk(out_chunks)

    sharding = m.sharding
    split_queries = _decide(sharding.queries, meta, params)
    q_bounds = _bounds(q.chunks[-2] if split_queries else (meta.Nq,))
    k_bounds = _bounds(k.chunks[-2] if sharding.key_blocks is not None else (meta.Nk,))
    key_blocks = len(k_bounds) > 1

    # 2. Resolve, choose the backend, draw and fit once, for the whole problem: here, or in
    #    one task that sees all the data when the method's resolve reads it or the call fits.
    resolved = None if _decide(sharding.reads_data, meta, params) else resolve_params(m, meta, params)
    if resolved is None or m.fits(meta, resolved):
        whole = [_single_block(x) for x in (q, k, v, mask)]
        shared = dask.delayed(prepare_on_data, pure=False)(
            *whole, method=m, backend=backend, causal=causal, scale=meta.scale, rng=rng,
            check_finite=check_finite, params=params)
    else:
        shared = None
        prepared = prepare(m, meta, backend=backend, rng=rng, params=params, resolved=resolved)
        check_declared(m, prepared.kwargs)

    # 3. One task per (leading block, query block, visible key block); a merge tree per
    #    (leading block, query block) when the keys are split.
    q_sizes = tuple(b - a for a, b in q_bounds)
    k_sizes = tuple(b - a for a, b in k_bounds)
    blocks = {
        name: None if x is None else _aligned(x, meta.batch_shape, lead_chunks, tail).to_delayed()
        for name, x, tail in (("q", q, (q_sizes, (meta.D,))), ("k", k, (k_sizes, (meta.D,))),
                              ("v", v, (k_sizes, (meta.Dv,))), ("mask", mask, (k_sizes,)))
    }
    lead_bounds = [_bounds(c) for c in lead_chunks]
    slice_ids = np.arange(meta.G, dtype=np.int64).reshape(meta.batch_shape)
    token = uuid.uuid4().hex[:12]
    offset = meta.offset
    out_blocks = {}
    for b in itertools.product(*(range(len(c)) for c in lead_chunks)):
        lead = tuple(slice(*lead_bounds[a][i]) for a, i in enumerate(b))
        lead_shape = tuple(s.stop - s.start for s in lead)
        slices = slice_ids[lead].ravel()
        for iq, (q0, q1) in enumerate(q_bounds):
            part_kwargs = None
            partials = []
            for ik, (k0, k1) in enumerate(k_bounds):
                if offset is not None and k0 > q1 - 1 + offset:
                    continue                                                 # every key is in every query's future
                part = Part(slices, slice(q0, q1), slice(k0, k1))
                if shared is None:
                    if part_kwargs is None:
                        part_kwargs = take_part(sharding, prepared.kwargs, part, meta.G)
                    job = Prepared(prepared.impl, part_kwargs, whole=False)
                else:
                    job = shared
                partials.append(dask.delayed(run_part, pure=False)(
                    blocks["q"][(*b, iq, 0)], blocks["k"][(*b, ik, 0)], blocks["v"][(*b, ik, 0)],
                    None if blocks["mask"] is None else blocks["mask"][(*b, ik)], job, part,
                    method=m, G=meta.G, offset=None if offset is None else offset + q0 - k0, scale=meta.scale,
                    check_finite=check_finite, with_lse=key_blocks,
                    dask_key_name=(f"eff_attn-{m.name}-part-{token}", *b, iq, ik)))
            shape = (*lead_shape, q1 - q0, meta.Dv)
            if not partials:
                task = dask.delayed(no_visible_keys)(shape, like, dask_key_name=(f"eff_attn-zeros-{token}", *b, iq))
            elif not key_blocks:
                task = partials[0]
            else:
                task = _merge_tree(partials, split_every, (f"eff_attn-merge-{token}", *b, iq))
            out_blocks[(*b, iq)] = da.from_delayed(task, shape=shape, dtype=meta.q.dtype, meta=like)
    out = da.block(_nested(out_blocks, [len(c) for c in lead_chunks] + [len(q_bounds)]))
    return out.rechunk(out_chunks)


def _as_dask(x, name):
    if x is None or isinstance(x, da.Array):
        return x
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be a dask array (or a NumPy or CuPy array), got {type(x).__name__}")
    return da.from_array(x, chunks=x.shape)


def _meta_problem(arrays, *, causal, scale):
    """The whole call's :class:`~eff_attn._validate.Problem`, with zero-stride stand-ins for the data.

    Validation is the single-machine one: :func:`eff_attn._validate.check_inputs`
    runs on stand-ins with the real leading axes and feature sizes and one
    row each (``O(G (D + Dv))`` memory), and the sequence lengths are checked
    here. ``resolve`` of a method that reads only shapes, and every
    ``draw``, run on the result.
    """
    for name in ("q", "k", "v"):
        x = arrays[name]
        if x is None:
            raise TypeError(f"{name} is None; expected an array of shape (..., N, D)")
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape (..., N, D) with at least 2 axes, got shape {x.shape}")
    q, k, v, mask = arrays["q"], arrays["k"], arrays["v"], arrays["mask"]
    Nq, Nk = q.shape[-2], k.shape[-2]
    if v.shape[-2] != Nk:
        raise ValueError(f"v has Nk={v.shape[-2]} rows but k has Nk={Nk}; v must be (..., Nk, Dv)")
    for name, n in (("q", Nq), ("k", Nk)):
        if n < 1:
            raise ValueError(f"{name} has no rows (shape {arrays[name].shape}); N must be at least 1")
    if mask is not None and (mask.ndim < 1 or mask.shape[-1] != Nk):
        raise ValueError(f"mask must have shape (..., Nk) with Nk={Nk}, got shape {mask.shape}")
    stand_in = {name: array_module(x._meta).zeros((*x.shape[:-2], 1, x.shape[-1]), dtype=x.dtype)
                for name, x in (("q", q), ("k", k), ("v", v))}
    stand_mask = None if mask is None else array_module(mask._meta).zeros((*mask.shape[:-1], 1), dtype=mask.dtype)
    small = check_inputs(stand_in["q"], stand_in["k"], stand_in["v"], mask=stand_mask, causal=causal, scale=scale,
                         check_finite=False)
    G, D, Dv = small.G, small.D, small.Dv
    dtype = small.q.dtype
    xp = small.xp

    def zeros(shape, dt=dtype):
        return xp.broadcast_to(xp.zeros((), dtype=dt), shape)

    return replace(small, q=zeros((G, Nq, D)), k=zeros((G, Nk, D)), v=zeros((G, Nk, Dv)),
                   mask=None if mask is None else zeros((G, Nk), bool), offset=causal_offset(causal, Nq, Nk))


def _lead_chunks(arrays, batch_shape):
    """Chunks of each leading axis: those of the first of q, k, v, mask that is not broadcast there."""
    chunks = []
    L = len(batch_shape)
    for i, n in enumerate(batch_shape):
        found = (n,)
        for name in ("q", "k", "v", "mask"):
            x = arrays[name]
            if x is None:
                continue
            lead = x.ndim - (1 if name == "mask" else 2)
            axis = i - (L - lead)
            if axis >= 0 and x.shape[axis] == n:
                found = x.chunks[axis]
                break
        chunks.append(tuple(found))
    return tuple(chunks)


def _aligned(x, batch_shape, lead_chunks, tail_chunks):
    """``x`` broadcast to the leading axes and rechunked to the call's blocks."""
    tail = x.shape[x.ndim - len(tail_chunks):]
    return da.broadcast_to(x, (*batch_shape, *tail)).rechunk((*lead_chunks, *tail_chunks))


def _single_block(x):
    """The one block of ``x`` rechunked to a single chunk, as a Delayed (None stays None)."""
    if x is None:
        return None
    return x.rechunk(x.shape).to_delayed().ravel()[0]


def _bounds(chunks):
    """``[(start, stop), ...]`` of consecutive chunk sizes."""
    stops = np.cumsum(chunks).tolist()
    return [(stop - n, stop) for n, stop in zip(chunks, stops)]


def _decide(flag, problem, params) -> bool:
    return bool(flag(problem, params) if callable(flag) else flag)


def _merge_tree(partials, split_every, key):
    """Merge partials ``split_every`` at a time, level by level; the root returns the output."""
    level = 0
    while len(partials) > split_every:
        partials = [
            dask.delayed(merge_partials, pure=False)(*partials[i:i + split_every],
                                                     dask_key_name=(*key, level, i // split_every))
            for i in range(0, len(partials), split_every)
        ]
        level += 1
    return dask.delayed(merged_output, pure=False)(*partials, dask_key_name=(*key, level, 0))


def _nested(blocks, counts):
    """The blocks as the nested lists :func:`dask.array.block` takes (one block along Dv)."""
    def build(prefix):
        if len(prefix) == len(counts):
            return [blocks[prefix]]
        return [build((*prefix, i)) for i in range(counts[len(prefix)])]
    return build(())

